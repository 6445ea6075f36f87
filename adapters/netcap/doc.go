// Package netcap gives guests network access as capabilities: a host
// offers a Network (netcap.capnp) restricted by a Policy, and a guest
// can reach only the addresses and ports it was given.
//
// The host side is NewNetwork (or NewServer): each connect and listen is
// checked against the Policy, which denies by default, then opened
// through a Backend — the host kernel's sockets (KernelBackend) or a
// userspace stack such as an adapters/netstack Stack (StackBackend). A
// host name is resolved on the host and every address it resolves to is
// checked against the policy again, unless a rule names the host itself.
// Limits bound the streams and listeners open at once. Releasing the
// Network's last reference, as when the guest's connection ends, closes
// every socket opened through it.
//
// The guest side is Dial and Listen, which return a standard net.Conn and
// net.Listener over the capability, with deadlines, CloseWrite and
// cancellation through contexts. A guest's Close is graceful: the host
// writes the guest's bytes and a FIN, then reads and discards until the
// remote's end of stream (at most Options.Linger) before closing the
// socket, since closing it with unread bytes would send a reset that can
// make the remote lose the guest's last bytes.
//
// Every request gets an answer: failures are typed results (Failure, with
// a Kind), not only exceptions, and come back to Go callers as *Error
// values that match the sentinels (errors.Is(err, ErrDenied), ErrRefused,
// ErrTimeout, ...).
//
// Bytes move over core/bytestream's ByteStream in both directions. The
// guest passes the host a ByteStream for the remote's bytes (down) and
// gets one for its own (up). Writes are streaming calls within a
// flow-control window, each handled once its bytes are written to the
// socket (up) or read by the guest (down), so a slow reader on either
// side slows the writer on the other and neither side buffers without
// bound: a guest that stops reading stops the host reading the socket,
// and TCP holds the remote sender back.
package netcap
