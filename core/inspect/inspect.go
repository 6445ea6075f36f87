// Package inspect lets a vat show its connections and their tables
// (questions, answers, imports, exports, embargoes) to a peer it trusts:
// the leak-hunting view of `captp inspect`.
//
// A Registry tracks the connections of a vat; its Inspector is a
// capability that reads them. Inspection is opt-in and is granted like any
// other capability: serve the Inspector to those who may read the tables
// (captp serve -inspect makes it a sturdy ref of its own). Fetch, on the
// other side, turns an Inspector into a Report.
package inspect

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/flow"
)

// Options configure a Registry. All fields are optional.
type Options struct {
	// Name is the vat's name in reports.
	Name string
	// MaxConns bounds the connections tracked at once (default 1024):
	// Track refuses more, and counts them as dropped.
	MaxConns int
	// MaxEntries bounds the entries listed per table of each connection
	// in an Inspector's reply (default 1000; a caller may ask for fewer).
	// The counts are always complete.
	MaxEntries int
	// MaxTotalEntries bounds the entries of one reply, all connections
	// together (default 50000), so that a vat with many busy connections
	// answers with a bounded message: connections beyond it get their
	// counts only.
	MaxTotalEntries int
	// Vat, if the vat does three-party handoff, adds its Level 3 figures.
	Vat *core.Vat
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// Registry tracks the connections of a vat. It is safe for concurrent
// use. A connection is forgotten once it is done (checked whenever the
// registry is used, so no goroutine watches it).
type Registry struct {
	opts    Options
	started time.Time

	mu      sync.Mutex
	next    uint64
	conns   []*tracked // in tracking order
	dropped uint64
}

type tracked struct {
	id    uint64
	conn  *core.Conn
	label string
	since time.Time
}

// NewRegistry returns an empty registry; opts may be nil.
func NewRegistry(opts *Options) *Registry {
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.MaxConns <= 0 {
		o.MaxConns = 1024
	}
	if o.MaxEntries <= 0 {
		o.MaxEntries = 1000
	}
	if o.MaxTotalEntries <= 0 {
		o.MaxTotalEntries = 50000
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Registry{opts: o, started: o.Now()}
}

// Track adds conn, described by label (who the peer is), until it is
// done. It reports false, and tracks nothing, when the registry is full.
// Tracking a connection twice is harmless.
func (r *Registry) Track(conn *core.Conn, label string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pruneLocked()
	for _, t := range r.conns {
		if t.conn == conn {
			return true
		}
	}
	if len(r.conns) >= r.opts.MaxConns {
		r.dropped++
		return false
	}
	r.next++
	r.conns = append(r.conns, &tracked{id: r.next, conn: conn, label: label, since: r.opts.Now()})
	return true
}

// pruneLocked forgets the connections that are done.
func (r *Registry) pruneLocked() {
	live := r.conns[:0]
	for _, t := range r.conns {
		select {
		case <-t.conn.Done():
		default:
			live = append(live, t)
		}
	}
	clear(r.conns[len(live):])
	r.conns = live
}

// list returns the live tracked connections.
func (r *Registry) list() []*tracked {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pruneLocked()
	return append([]*tracked(nil), r.conns...)
}

// Report describes the vat and every tracked connection, with at most
// maxEntries entries per table (0 or more than Options.MaxEntries:
// Options.MaxEntries), in process.
func (r *Registry) Report(maxEntries int) Report {
	conns := r.list()
	rep := Report{Vat: r.vatStatus(len(conns))}
	budget := r.opts.MaxTotalEntries
	per := r.opts.MaxEntries
	if maxEntries > 0 && maxEntries < per {
		per = maxEntries
	}
	for _, t := range conns {
		s := t.conn.Snapshot()
		s.Questions = cut(s.Questions, per, &budget)
		s.Answers = cut(s.Answers, per, &budget)
		s.Imports = cut(s.Imports, per, &budget)
		s.Exports = cut(s.Exports, per, &budget)
		s.Embargoes = cut(s.Embargoes, per, &budget)
		s.Provides = cut(s.Provides, per, &budget)
		rep.Conns = append(rep.Conns, ConnStatus{ID: t.id, Label: t.label, Since: t.since, Snapshot: s})
	}
	return rep
}

// cut keeps at most per of s's entries, and no more than *budget, which
// it charges: the budget is spent table by table so it never goes
// negative.
func cut[T any](s []T, per int, budget *int) []T {
	n := min(len(s), per, *budget)
	*budget -= n
	return s[:n:n]
}

func (r *Registry) vatStatus(conns int) VatStatus {
	r.mu.Lock()
	dropped := r.dropped
	r.mu.Unlock()
	v := VatStatus{Name: r.opts.Name, StartedAt: r.started, Now: r.opts.Now(), Connections: conns, Dropped: dropped}
	if r.opts.Vat != nil {
		s := r.opts.Vat.Snapshot()
		v.Level3 = &s
	}
	return v
}

// A Report is what an Inspector tells: the vat and its connections.
type Report struct {
	Vat   VatStatus    `json:"vat"`
	Conns []ConnStatus `json:"connections"`
}

// VatStatus describes a vat as a whole.
type VatStatus struct {
	Name      string    `json:"name,omitempty"`
	StartedAt time.Time `json:"startedAt"`
	Now       time.Time `json:"now"` // by the vat's clock, when it answered
	// Connections counts the tracked connections; Dropped those that
	// were not tracked because the registry was full.
	Connections int    `json:"connections"`
	Dropped     uint64 `json:"dropped,omitempty"`
	// Level3 is set for a vat that does three-party handoff.
	Level3 *core.VatSnapshot `json:"level3,omitempty"`
}

// ConnStatus describes one connection. Its Snapshot's Stats are the
// complete table sizes; its lists may have been cut (see
// Options.MaxEntries).
type ConnStatus struct {
	ID       uint64        `json:"id"`
	Label    string        `json:"label,omitempty"`
	Since    time.Time     `json:"since"`
	Snapshot core.Snapshot `json:"snapshot"`
}

// Inspector returns the registry's Inspector capability. Each call makes
// a new client; the caller owns it.
func (r *Registry) Inspector() Inspector {
	return Inspector_ServerToClient(inspectorServer{r})
}

type inspectorServer struct{ r *Registry }

func (s inspectorServer) Vat(ctx context.Context, call Inspector_vat) error {
	res, err := call.AllocResults()
	if err != nil {
		return err
	}
	info, err := res.NewInfo()
	if err != nil {
		return err
	}
	return writeVat(info, s.r.vatStatus(len(s.r.list())))
}

func (s inspectorServer) Connections(ctx context.Context, call Inspector_connections) error {
	rep := s.r.Report(int(min(call.Args().MaxEntries(), math.MaxInt32)))
	res, err := call.AllocResults()
	if err != nil {
		return err
	}
	list, err := res.NewConns(int32(len(rep.Conns)))
	if err != nil {
		return err
	}
	for i, c := range rep.Conns {
		if err := writeConn(list.At(i), c); err != nil {
			return fmt.Errorf("inspect: connection %d: %w", c.ID, err)
		}
	}
	return nil
}

func writeVat(w VatInfo, v VatStatus) error {
	if err := w.SetName(v.Name); err != nil {
		return err
	}
	w.SetStartedAt(v.StartedAt.UnixNano())
	w.SetNow(v.Now.UnixNano())
	w.SetConnections(u32(v.Connections))
	w.SetDropped(v.Dropped)
	if v.Level3 != nil {
		w.SetLevel3(true)
		w.SetProvisions(u32(v.Level3.Provisions))
		w.SetEarlyAccepts(u32(v.Level3.EarlyAccepts))
	}
	return nil
}

func u32(n int) uint32 { return uint32(max(0, min(n, math.MaxUint32))) }

func u64(n int64) uint64 { return uint64(max(0, n)) }

func writeConn(w Connection, c ConnStatus) error {
	s := c.Snapshot
	w.SetId(c.ID)
	if err := w.SetLabel(c.Label); err != nil {
		return err
	}
	w.SetSince(c.Since.UnixNano())
	w.SetClosing(s.Closing)
	if s.Err != "" {
		if err := w.SetErr(s.Err); err != nil {
			return err
		}
	}
	w.SetQuestionCount(u32(s.Stats.Questions))
	w.SetAnswerCount(u32(s.Stats.Answers))
	w.SetImportCount(u32(s.Stats.Imports))
	w.SetExportCount(u32(s.Stats.Exports))
	w.SetEmbargoCount(u32(s.Stats.Embargoes))
	w.SetQueuedBytes(u64(int64(s.QueuedBytes)))
	w.SetInboundHeldBytes(u64(s.InboundHeldBytes))
	w.SetInProgress(u32(s.InProgress))
	w.SetFlowInFlight(u64(int64(s.Flow.InFlight)))
	w.SetFlowPeak(u64(int64(s.Flow.PeakInFlight)))
	w.SetFlowWaiting(u32(s.Flow.Waiting))
	w.SetHandoffs(u32(s.Handoffs))

	qs, err := w.NewQuestions(int32(len(s.Questions)))
	if err != nil {
		return err
	}
	for i, q := range s.Questions {
		e := qs.At(i)
		e.SetId(q.ID)
		e.SetReturned(q.Returned)
		e.SetFinished(q.Finished)
		e.SetReleased(q.Released)
		e.SetBootstrap(q.Bootstrap)
		if err := e.SetMethod(q.Method); err != nil {
			return err
		}
		e.SetInterfaceId(q.InterfaceID)
		e.SetMethodId(q.MethodID)
		e.SetPipelined(u32(q.Pipelined))
	}
	as, err := w.NewAnswers(int32(len(s.Answers)))
	if err != nil {
		return err
	}
	for i, a := range s.Answers {
		e := as.At(i)
		e.SetId(a.ID)
		e.SetReturned(a.Returned)
		e.SetFinished(a.Finished)
		e.SetQueued(u32(a.Queued))
		e.SetResultExports(u32(a.ResultExports))
		e.SetArgsBytes(u64(a.ArgsBytes))
		e.SetProvide(a.Provide)
		e.SetAccept(a.Accept)
	}
	is, err := w.NewImports(int32(len(s.Imports)))
	if err != nil {
		return err
	}
	for i, im := range s.Imports {
		e := is.At(i)
		e.SetId(im.ID)
		e.SetRefs(im.Refs)
		e.SetClients(u32(im.Clients))
		e.SetPromise(im.Promise)
		e.SetResolved(im.Resolved)
		if im.Flow != nil {
			e.SetHasFlow(true)
			e.SetFlowWindow(u64(int64(im.Flow.Window)))
			e.SetFlowInFlight(u64(int64(im.Flow.InFlight)))
		}
	}
	es, err := w.NewExports(int32(len(s.Exports)))
	if err != nil {
		return err
	}
	for i, ex := range s.Exports {
		e := es.At(i)
		e.SetId(ex.ID)
		e.SetRefs(ex.Refs)
		e.SetPromise(ex.Promise)
		e.SetResolved(ex.Resolved)
		e.SetVine(ex.Vine)
		e.SetLoopback(ex.Loopback)
		if err := e.SetWhat(ex.What); err != nil {
			return err
		}
	}
	em, err := w.NewEmbargoes(int32(len(s.Embargoes)))
	if err != nil {
		return err
	}
	for i, x := range s.Embargoes {
		em.Set(i, x.ID)
	}
	ps, err := w.NewProvides(int32(len(s.Provides)))
	if err != nil {
		return err
	}
	for i, p := range s.Provides {
		ps.At(i).SetQuestionId(p.QuestionID)
		ps.At(i).SetSent(p.Sent)
	}
	return nil
}

// ErrNotInspector is returned by Fetch when the capability is not an
// Inspector (its methods are unimplemented).
var ErrNotInspector = errors.New("inspect: the capability is not an Inspector")

// maxFetchEntries bounds the connections and table entries Fetch decodes
// from one reply, all together: a capnp list element may be a word on
// the wire but is a hundred bytes or so decoded, so a hostile vat could
// otherwise make a 64 MiB reply cost a gigabyte. It is well above what
// a vat with the default Options sends.
const maxFetchEntries = 1 << 18

// Fetch asks an Inspector for the vat's report, listing at most
// maxEntries entries per table (0: the vat's default). A reply listing
// more than 262144 connections and entries in all is refused.
func Fetch(ctx context.Context, in Inspector, maxEntries int) (Report, error) {
	vf, releaseVat := in.Vat(ctx, nil)
	defer releaseVat()
	cf, releaseConns := in.Connections(ctx, func(p Inspector_connections_Params) error {
		p.SetMaxEntries(u32(maxEntries))
		return nil
	})
	defer releaseConns()
	var rep Report
	vres, err := vf.Struct()
	if err != nil {
		return rep, fetchErr("vat", err)
	}
	info, err := vres.Info()
	if err != nil {
		return rep, fmt.Errorf("inspect: decode vat: %w", err)
	}
	if rep.Vat, err = readVat(info); err != nil {
		return rep, err
	}
	cres, err := cf.Struct()
	if err != nil {
		return rep, fetchErr("connections", err)
	}
	list, err := cres.Conns()
	if err != nil {
		return rep, fmt.Errorf("inspect: decode connections: %w", err)
	}
	budget := maxFetchEntries
	if err := spend(&budget, list.Len()); err != nil {
		return rep, err
	}
	for i := 0; i < list.Len(); i++ {
		c, err := readConn(list.At(i), &budget)
		if err != nil {
			return rep, fmt.Errorf("inspect: decode connection %d: %w", i, err)
		}
		rep.Conns = append(rep.Conns, c)
	}
	return rep, nil
}

func fetchErr(what string, err error) error {
	if capnp.IsUnimplemented(err) {
		return fmt.Errorf("%w (%s: %v)", ErrNotInspector, what, err)
	}
	return fmt.Errorf("inspect: %s: %w", what, err)
}

func readVat(r VatInfo) (VatStatus, error) {
	name, err := r.Name()
	if err != nil {
		return VatStatus{}, fmt.Errorf("inspect: decode vat name: %w", err)
	}
	v := VatStatus{
		Name:        name,
		StartedAt:   time.Unix(0, r.StartedAt()),
		Now:         time.Unix(0, r.Now()),
		Connections: int(r.Connections()),
		Dropped:     r.Dropped(),
	}
	if r.Level3() {
		v.Level3 = &core.VatSnapshot{Provisions: int(r.Provisions()), EarlyAccepts: int(r.EarlyAccepts())}
	}
	return v, nil
}

// spend charges n decoded entries to budget.
func spend(budget *int, n int) error {
	if n > *budget {
		return fmt.Errorf("inspect: reply lists more than %d connections and entries", maxFetchEntries)
	}
	*budget -= n
	return nil
}

func readConn(r Connection, budget *int) (ConnStatus, error) {
	label, err := r.Label()
	if err != nil {
		return ConnStatus{}, err
	}
	errText, err := r.Err()
	if err != nil {
		return ConnStatus{}, err
	}
	c := ConnStatus{ID: r.Id(), Label: label, Since: time.Unix(0, r.Since())}
	s := &c.Snapshot
	s.Stats = core.Stats{
		Questions: int(r.QuestionCount()),
		Answers:   int(r.AnswerCount()),
		Imports:   int(r.ImportCount()),
		Exports:   int(r.ExportCount()),
		Embargoes: int(r.EmbargoCount()),
	}
	s.Closing, s.Err = r.Closing(), errText
	s.QueuedBytes = int(min(r.QueuedBytes(), math.MaxInt32))
	s.InboundHeldBytes = int64(min(r.InboundHeldBytes(), math.MaxInt64))
	s.InProgress = int(r.InProgress())
	s.Flow = flow.PoolStats{
		InFlight:     int(min(r.FlowInFlight(), math.MaxInt32)),
		PeakInFlight: int(min(r.FlowPeak(), math.MaxInt32)),
		Waiting:      int(r.FlowWaiting()),
	}
	s.Handoffs = int(r.Handoffs())

	qs, err := r.Questions()
	if err != nil {
		return c, err
	}
	if err := spend(budget, qs.Len()); err != nil {
		return c, err
	}
	for i := 0; i < qs.Len(); i++ {
		q := qs.At(i)
		m, err := q.Method()
		if err != nil {
			return c, err
		}
		s.Questions = append(s.Questions, core.QuestionInfo{
			ID: q.Id(), Returned: q.Returned(), Finished: q.Finished(), Released: q.Released(),
			Bootstrap: q.Bootstrap(), Method: m, InterfaceID: q.InterfaceId(), MethodID: q.MethodId(),
			Pipelined: int(q.Pipelined()),
		})
	}
	as, err := r.Answers()
	if err != nil {
		return c, err
	}
	if err := spend(budget, as.Len()); err != nil {
		return c, err
	}
	for i := 0; i < as.Len(); i++ {
		a := as.At(i)
		s.Answers = append(s.Answers, core.AnswerInfo{
			ID: a.Id(), Returned: a.Returned(), Finished: a.Finished(), Queued: int(a.Queued()),
			ResultExports: int(a.ResultExports()), ArgsBytes: int64(min(a.ArgsBytes(), math.MaxInt64)),
			Provide: a.Provide(), Accept: a.Accept(),
		})
	}
	is, err := r.Imports()
	if err != nil {
		return c, err
	}
	if err := spend(budget, is.Len()); err != nil {
		return c, err
	}
	for i := 0; i < is.Len(); i++ {
		im := is.At(i)
		info := core.ImportInfo{ID: im.Id(), Refs: im.Refs(), Clients: int(im.Clients()), Promise: im.Promise(), Resolved: im.Resolved()}
		if im.HasFlow() {
			info.Flow = &flow.Stats{Window: int(min(im.FlowWindow(), math.MaxInt32)), InFlight: int(min(im.FlowInFlight(), math.MaxInt32))}
		}
		s.Imports = append(s.Imports, info)
	}
	es, err := r.Exports()
	if err != nil {
		return c, err
	}
	if err := spend(budget, es.Len()); err != nil {
		return c, err
	}
	for i := 0; i < es.Len(); i++ {
		e := es.At(i)
		what, err := e.What()
		if err != nil {
			return c, err
		}
		s.Exports = append(s.Exports, core.ExportInfo{
			ID: e.Id(), Refs: e.Refs(), Promise: e.Promise(), Resolved: e.Resolved(),
			Vine: e.Vine(), Loopback: e.Loopback(), What: what,
		})
	}
	em, err := r.Embargoes()
	if err != nil {
		return c, err
	}
	if err := spend(budget, em.Len()); err != nil {
		return c, err
	}
	for i := 0; i < em.Len(); i++ {
		s.Embargoes = append(s.Embargoes, core.EmbargoInfo{ID: em.At(i)})
	}
	ps, err := r.Provides()
	if err != nil {
		return c, err
	}
	if err := spend(budget, ps.Len()); err != nil {
		return c, err
	}
	for i := 0; i < ps.Len(); i++ {
		p := ps.At(i)
		s.Provides = append(s.Provides, core.ProvideInfo{QuestionID: p.QuestionId(), Sent: p.Sent()})
	}
	return c, nil
}
