//go:build !tamago

package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "vat: this is a TamaGo image: build it with GOOS=tamago (make tamago) and boot it with captp host")
	os.Exit(2)
}
