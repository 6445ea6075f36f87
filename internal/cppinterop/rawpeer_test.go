package cppinterop

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"
)

// rpcFrame builds one RPC message with fill and returns its stream
// framing.
func rpcFrame(fill func(m rpccp.Message) error) []byte {
	msg, seg, err := capnp.NewMessage(capnp.SingleSegment(nil))
	if err != nil {
		panic(err)
	}
	defer msg.Release()
	m, err := rpccp.NewRootMessage(seg)
	if err != nil {
		panic(err)
	}
	if err := fill(m); err != nil {
		panic(err)
	}
	b, err := msg.Marshal()
	if err != nil {
		panic(err)
	}
	return b
}

func bootstrapFrame(qid uint32) []byte {
	return rpcFrame(func(m rpccp.Message) error {
		b, err := m.NewBootstrap()
		if err != nil {
			return err
		}
		b.SetQuestionId(qid)
		return nil
	})
}

// callFrame is a Call of Test.echo(data) on the capability answered to
// question target (promisedAnswer) or, with imported set, on import id
// target.
func callFrame(qid, target uint32, imported bool, method uint16, data []byte) []byte {
	return rpcFrame(func(m rpccp.Message) error {
		c, err := m.NewCall()
		if err != nil {
			return err
		}
		c.SetQuestionId(qid)
		c.SetInterfaceId(0xcea30903072b4513) // testcapnp.Test_TypeID
		c.SetMethodId(method)
		mt, err := c.NewTarget()
		if err != nil {
			return err
		}
		if imported {
			mt.SetImportedCap(target)
		} else {
			pa, err := mt.NewPromisedAnswer()
			if err != nil {
				return err
			}
			pa.SetQuestionId(target)
		}
		p, err := c.NewParams()
		if err != nil {
			return err
		}
		args, err := capnp.NewStruct(p.Segment(), capnp.ObjectSize{PointerCount: 1})
		if err != nil {
			return err
		}
		if data != nil {
			if err := args.SetData(0, data); err != nil {
				return err
			}
		}
		return p.SetContent(args.ToPtr())
	})
}

func finishFrame(qid uint32) []byte {
	return rpcFrame(func(m rpccp.Message) error {
		f, err := m.NewFinish()
		if err != nil {
			return err
		}
		f.SetQuestionId(qid)
		f.SetReleaseResultCaps(true)
		return nil
	})
}

// received is what a raw peer read from the other side.
type received struct {
	msgs []rpccp.Message_Which
	// abort is the reason of the Abort message, if one arrived.
	abort    string
	gotAbort bool
	// end is how reading ended: io.EOF, a reset, or a timeout.
	end error
}

// readAll reads RPC messages from c until it ends or deadline passes.
func readAll(c net.Conn, deadline time.Time) received {
	var r received
	c.SetReadDeadline(deadline)
	dec := capnp.NewDecoder(c)
	dec.MaxMessageSize = 128 << 20
	for {
		msg, err := dec.Decode()
		if err != nil {
			r.end = err
			return r
		}
		m, err := rpccp.ReadRootMessage(msg)
		if err != nil {
			r.end = fmt.Errorf("undecodable message: %w", err)
			return r
		}
		r.msgs = append(r.msgs, m.Which())
		if m.Which() == rpccp.Message_Which_abort {
			r.gotAbort = true
			if e, err := m.Abort(); err == nil {
				r.abort, _ = e.Reason()
			}
		}
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

func isEOF(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, os.ErrClosed) || isReset(err)
}
