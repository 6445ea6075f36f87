//go:build !unix && !windows

package netcap

// classifyErrno: without kernel errors (TamaGo, wasm) classify goes by
// the error's text.
func classifyErrno(error) (Kind, bool) { return 0, false }
