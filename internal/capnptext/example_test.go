package capnptext_test

import (
	"fmt"
	"os"

	"github.com/captp-go/captp/internal/capnptext"
)

// Parse a compiled schema, plan a pipelined call chain, and encode and
// print a method's parameters in Cap'n Proto text form.
func Example() {
	// testdata/test.capnp.bin is `capnp compile -o-` output; capnptext.Load
	// runs the compiler on .capnp files instead.
	data, err := os.ReadFile("testdata/test.capnp.bin")
	if err != nil {
		fmt.Println(err)
		return
	}
	sch, err := capnptext.Parse(data)
	if err != nil {
		fmt.Println(err)
		return
	}
	steps, err := sch.ParseChain(`Dir.getFile(name = "notes.txt").read(offset = 0, n = 16)`)
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, st := range steps {
		fmt.Printf("%s: ordinal %d, pipelined on %v\n", st.Method, st.Method.ID, st.Transform)
	}
	// Encode the second call's parameters as PlaceArgs would, and print them.
	params, err := capnptext.EncodeNew(steps[1].Method.Params, `(n = 16, offset = 0x10)`)
	if err != nil {
		fmt.Println(err)
		return
	}
	text, err := capnptext.Format(params, steps[1].Method.Params)
	fmt.Println(text, err)
	// Output:
	// Dir.getFile: ordinal 0, pipelined on []
	// File.read: ordinal 1, pipelined on [get field 0]
	// (offset = 16, n = 16) <nil>
}
