package main

// hasNamespace reports whether b contains namespace, with the search the entry uses
// (for tests: it must agree with hookproto.Protected).
//
//go:noescape
func hasNamespace(b []byte) bool

// entry is the process's entry point when linked with -ldflags=-E=main.entry (see the
// package doc); declared here for vet.
func entry()
