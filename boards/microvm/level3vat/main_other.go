//go:build !tamago

package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "level3vat: this is a TamaGo image: build it with GOOS=tamago (make tamago) and boot it with QEMU (see cmd/captp's TestLevel3Guest tests)")
	os.Exit(2)
}
