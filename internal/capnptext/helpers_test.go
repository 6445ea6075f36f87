package capnptext

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"

	"capnproto.org/go/capnp/v3"
)

// The committed compiled form of testdata/test.capnp, made by
//
//	capnp compile -o- --src-prefix=testdata testdata/test.capnp > testdata/test.capnp.bin
//
// TestCompiledSchemaUpToDate checks it against the compiler when present.
const testSchemaBin = "testdata/test.capnp.bin"

var (
	testSchemaOnce sync.Once
	testSchemaVal  *Schema
	testSchemaErr  error
)

// testSchema returns the test schema, parsed from the committed compiled
// request, so that most tests run without the compiler.
func testSchema(t testing.TB) *Schema {
	t.Helper()
	testSchemaOnce.Do(func() {
		data, err := os.ReadFile(testSchemaBin)
		if err != nil {
			testSchemaErr = err
			return
		}
		testSchemaVal, testSchemaErr = Parse(data)
	})
	if testSchemaErr != nil {
		t.Fatalf("test schema: %v", testSchemaErr)
	}
	return testSchemaVal
}

func lookup(t testing.TB, s *Schema, name string) *Node {
	t.Helper()
	n, err := s.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// needCapnp skips a test loudly when the capnp compiler is missing (the
// message also goes to stderr, which `go test` shows in directory mode and
// with -v). Under CI (CI set, as .ci/run runs, after `make deps` installed
// capnproto) a missing compiler fails the test instead, so that the
// comparisons with capnp's own tools cannot silently stop running.
func needCapnp(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("capnp"); err != nil {
		msg := fmt.Sprintf("%s: the capnp compiler is not installed, so capnptext is NOT checked against capnp's own encode/decode. Install the Debian package capnproto (make deps).", t.Name())
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		fmt.Fprintf(os.Stderr, "\n*** SKIPPING %s ***\n\n", msg)
		t.Skip("SKIPPING " + msg)
	}
}

// capnpTool runs capnp with args in the package directory.
func capnpTool(t testing.TB, stdin []byte, args ...string) []byte {
	t.Helper()
	cmd := exec.Command("capnp", args...)
	cmd.Stdin = bytes.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("capnp %s < %q: %v\n%s", strings.Join(args, " "), stdin, err, errb.String())
	}
	return out.Bytes()
}

// capnpEncode encodes text as typ with `capnp encode`.
func capnpEncode(t testing.TB, typ, text string) []byte {
	t.Helper()
	return capnpTool(t, []byte(text), "encode", "testdata/test.capnp", typ)
}

// capnpDecode prints a message with `capnp decode --short`.
func capnpDecode(t testing.TB, typ string, msg []byte) string {
	t.Helper()
	return strings.TrimSpace(string(capnpTool(t, msg, "decode", "--short", "testdata/test.capnp", typ)))
}

func rootOf(t testing.TB, msg []byte) capnp.Struct {
	t.Helper()
	m, err := capnp.Unmarshal(msg)
	if err != nil {
		t.Fatal(err)
	}
	p, err := m.Root()
	if err != nil {
		t.Fatal(err)
	}
	return p.Struct()
}

func marshal(t testing.TB, st capnp.Struct) []byte {
	t.Helper()
	b, err := st.Message().Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func canonical(t testing.TB, st capnp.Struct) []byte {
	t.Helper()
	b, err := capnp.Canonicalize(st)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
