package secure

import (
	"context"
	"strings"
	"testing"

	"capnproto.org/go/capnp/v3"
)

// A peer's malformed handoff values are errors, never panics, and say
// which value was wrong.
func TestNetworkRejectsMalformedValues(t *testing.T) {
	id, err := Generate()
	if err != nil {
		t.Fatal(err)
	}
	n := NewNetwork(id)
	for _, bad := range []string{"", "#", "no-nonce", "x#short", "capnp://insecure@/tmp/s/#AAAAAAAAAAAAAAAAAAAAAA", "sha-256:zz#AAAAAAAAAAAAAAAAAAAAAA"} {
		p, err := textPtr(bad)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := n.Connect(context.Background(), nil, p); err == nil {
			t.Errorf("Connect(%q) accepted", bad)
		}
		if _, err := n.Expect(nil, p); err == nil {
			t.Errorf("Expect(%q) accepted", bad)
		}
		if _, err := n.Complete(nil, p); err == nil {
			t.Errorf("Complete(%q) accepted", bad)
		}
	}
	if _, _, err := n.Connect(context.Background(), nil, capnp.Ptr{}); err == nil || !strings.Contains(err.Error(), "ThirdPartyToContact") {
		t.Errorf("Connect(null) = %v; want an error naming ThirdPartyToContact", err)
	}
}
