package swtpm

import (
	"context"
	"io"
	"net"
	"testing"
	"time"
)

// FuzzServerControl writes arbitrary bytes to the control channel of a server over a
// fake engine: whatever arrives, the server must not crash, must answer or close, and
// must stop when the connection goes away. Seeds: testdata/fuzz/FuzzServerControl.
func FuzzServerControl(f *testing.F) {
	f.Fuzz(func(t *testing.T, in []byte) {
		store := newMemStore()
		peer, conn := net.Pipe()
		srv, err := New(Config{
			Engine: newFakeEngine(store), Store: store, CtrlConn: conn,
			MessageTimeout: 5 * time.Millisecond, WriteTimeout: time.Second,
		})
		if err != nil {
			t.Fatal(err)
		}
		feedServer(t, srv, peer, in)
	})
}

// FuzzServerData writes arbitrary bytes to the data channel of a running server over a
// fake engine: no crash, and Serve ends when the one-shot connections are gone.
// Seeds: testdata/fuzz/FuzzServerData.
func FuzzServerData(f *testing.F) {
	f.Fuzz(func(t *testing.T, in []byte) {
		store := newMemStore()
		ctrlPeer, ctrlConn := net.Pipe()
		peer, conn := net.Pipe()
		srv, err := New(Config{
			Engine: newFakeEngine(store), Store: store, CtrlConn: ctrlConn, DataConn: conn,
			NotNeedInit: true, Startup: StartupClear, AllowSetLocality: true,
			MessageTimeout: 5 * time.Millisecond, WriteTimeout: time.Second,
		})
		if err != nil {
			t.Fatal(err)
		}
		feedServer(t, srv, peer, in, ctrlPeer)
	})
}

// feedServer runs srv.Serve, closes the peers in closed, writes in to peer (the server
// may close early: SHUTDOWN, a refused payload) while draining its answers, and closes
// peer; Serve must then return nil within 5 s.
func feedServer(t *testing.T, srv *Server, peer net.Conn, in []byte, closed ...net.Conn) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- srv.Serve(context.Background()) }()
	for _, c := range closed {
		c.Close()
	}
	drained := make(chan struct{})
	go func() { io.Copy(io.Discard, peer); close(drained) }()
	peer.SetWriteDeadline(time.Now().Add(2 * time.Second))
	peer.Write(in)
	peer.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve = %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("Serve still running 5 s after the connections closed (input %x)", in)
	}
	<-drained
}
