// Package conformance holds the interoperability suite: the same
// scenarios run between our core and go-capnp's rpc package in every
// pairing, over real Unix sockets, plus bad-input tests against our core.
// Everything is in the _test.go files.
package conformance
