package diskstore_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/captp-go/captp/adapters/diskstore"
	"github.com/captp-go/captp/core/sturdyref"
)

// A restorer's store on disk: what is saved is there after a reopen (a
// restart of the vat).
func ExampleOpen() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "store")
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "store.log")

	st, err := diskstore.Open(path, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	r := sturdyref.NewRestorer(sturdyref.RestorerOptions{Store: st})
	id, _ := r.SaveNew(ctx, sturdyref.Record{Kind: "counter", Data: []byte{42}})
	st.Close()

	st, err = diskstore.Open(path, nil) // after a restart
	if err != nil {
		fmt.Println(err)
		return
	}
	defer st.Close()
	rec, ok, _ := st.Get(ctx, sturdyref.KeyOf(id))
	fmt.Println(ok, rec.Kind, rec.Data)
	// Output: true counter [42]
}
