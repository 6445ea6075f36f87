module github.com/captp-go/captp

go 1.26.0

require (
	capnproto.org/go/capnp/v3 v3.1.0-alpha.2 // indirect
	github.com/colega/zeropool v0.0.0-20230505084239-6fb4a4f75381 // indirect
	go.uber.org/goleak v1.3.0
	golang.org/x/sync v0.7.0 // indirect
)
