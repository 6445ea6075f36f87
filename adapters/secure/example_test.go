package secure_test

import (
	"fmt"
	"strings"

	"github.com/captp-go/captp/adapters/secure"
)

// A vat's identity is a key pair; sturdy refs to the vat carry its
// fingerprint, which clients pin.
func ExampleGenerate() {
	id, err := secure.Generate()
	if err != nil {
		fmt.Println(err)
		return
	}
	fp := id.Fingerprint().String()
	fmt.Println(strings.HasPrefix(fp, "sha-256:"), len(fp))
	// Output: true 51
}
