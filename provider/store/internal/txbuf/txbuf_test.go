package txbuf

import (
	"fmt"
	"strings"
	"testing"
)

func TestCheckName(t *testing.T) {
	cases := []struct {
		bucket, key string
		ok          bool
	}{
		{"kdks", "0000000001", true},
		{"audit.head", "head", true},
		{"a-b_c.9", "\x00\xff/", true},
		{"", "k", false},
		{"b", "", false},
		{"B", "k", false},
		{"a/b", "k", false},
		{"a b", "k", false},
		{strings.Repeat("b", MaxBucketLen), strings.Repeat("k", MaxKeyLen), true},
		{strings.Repeat("b", MaxBucketLen+1), "k", false},
		{"b", strings.Repeat("k", MaxKeyLen+1), false},
	}
	for _, c := range cases {
		err := CheckName(c.bucket, c.key)
		if (err == nil) != c.ok {
			t.Errorf("CheckName(%.20q, %.20q) = %v, want ok=%v", c.bucket, c.key, err, c.ok)
		}
	}
}

func TestMerge(t *testing.T) {
	base := []KV{{"a", []byte("1")}, {"b", []byte("2")}, {"d", []byte("4")}}
	cases := []struct {
		name   string
		writes func(b *Buffer)
		prefix string
		want   string
	}{
		{"nothing pending", func(*Buffer) {}, "", "[a=1 b=2 d=4]"},
		{"insert between", func(b *Buffer) { b.Put("x", "c", []byte("3")) }, "", "[a=1 b=2 c=3 d=4]"},
		{"insert first and last", func(b *Buffer) { b.Put("x", "0", nil); b.Put("x", "z", []byte("9")) }, "", "[0= a=1 b=2 d=4 z=9]"},
		{"overwrite", func(b *Buffer) { b.Put("x", "b", []byte("2x")) }, "", "[a=1 b=2x d=4]"},
		{"delete", func(b *Buffer) { b.Delete("x", "a"); b.Delete("x", "d") }, "", "[b=2]"},
		{"delete missing", func(b *Buffer) { b.Delete("x", "c") }, "", "[a=1 b=2 d=4]"},
		{"other bucket ignored", func(b *Buffer) { b.Put("y", "c", []byte("3")) }, "", "[a=1 b=2 d=4]"},
		{"prefix filters pending", func(b *Buffer) { b.Put("x", "c", []byte("3")); b.Put("x", "bb", []byte("5")) }, "b", "[a=1 b=2 bb=5 d=4]"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := New()
			c.writes(b)
			var parts []string
			for _, kv := range b.Merge("x", c.prefix, base) {
				parts = append(parts, kv.Key+"="+string(kv.Value))
			}
			if got := fmt.Sprint(parts); got != c.want {
				t.Fatalf("Merge = %s, want %s", got, c.want)
			}
		})
	}
}
