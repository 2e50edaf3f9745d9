package restore

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"filippo.io/age"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/crypt"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
)

// Gap is a run of missing segments, both ends included.
type Gap struct {
	From  string `json:"from"`
	To    string `json:"to"`
	Count uint64 `json:"count"`
}

// Timeline summarises one timeline's segments in the archive.
type Timeline struct {
	Timeline uint32   `json:"timeline"`
	First    string   `json:"first"`
	Last     string   `json:"last"`
	Segments int      `json:"segments"`
	Partial  []string `json:"partial,omitempty"`
	Gaps     []Gap    `json:"gaps,omitempty"`
	History  bool     `json:"history"`
	// RangeEnd: the segment after Last exists only as ranges, and the
	// timeline's archive ends in them (not a gap).
	RangeEnd *RangeEnd `json:"range_end,omitempty"`
}

// Problem is one thing wrong with the archive.
type Problem struct {
	Key     string `json:"key,omitempty"`
	Problem string `json:"problem"`
}

// Report is the result of a walk over one server's archive.
type Report struct {
	Prefix      string     `json:"prefix"`
	SegmentSize uint64     `json:"segment_size"`
	Objects     int        `json:"objects"`
	Bytes       int64      `json:"bytes"`
	Timelines   []Timeline `json:"timelines"`
	Problems    []Problem  `json:"problems"`
	Checked     int        `json:"checked"` // objects whose bytes were downloaded and verified
	// RangeObjects counts the range objects (outside the WAL prefix);
	// LeftoverRanges those of segments also archived whole or as
	// .partial, which the archiver deletes (not a problem).
	RangeObjects   int `json:"range_objects"`
	LeftoverRanges int `json:"leftover_ranges"`
}

// OK reports whether nothing is wrong.
func (r *Report) OK() bool {
	if len(r.Problems) > 0 {
		return false
	}
	for _, t := range r.Timelines {
		if len(t.Gaps) > 0 {
			return false
		}
	}
	return true
}

// VerifyOptions tune Verify.
type VerifyOptions struct {
	SegmentSize pipeline.SegmentSize // 0: from the identity object or the objects' metadata
	Metadata    bool                 // check every object's metadata (one HEAD each)
	Deep        bool                 // download every object and check its SHA-256 and pages
	Parallel    int
	Progress    func(done, total int) // called as objects are checked
	// Identities decrypt encrypted objects (Deep, and history files).
	// Without them an encrypted history file is not parsed and Deep
	// reports every encrypted object as not verifiable.
	Identities []age.Identity
}

type object struct {
	key     string
	file    string // WAL file name: segment, segment.partial, tli.history
	codec   compress.Codec
	size    int64
	seg     pipeline.Segment
	kind    pipeline.Kind
	history uint32
}

// Verify walks the archive under layout: per timeline, the range of
// segments and the exact gaps, and the ranges it ends in (verifyRanges);
// the history chain; and, as asked, each object's metadata or bytes.
func Verify(ctx context.Context, sink sinks.Sink, layout sinks.Layout, o VerifyOptions) (*Report, error) {
	lister, ok := sink.(sinks.Lister)
	if !ok {
		return nil, errors.New("this destination cannot be listed")
	}
	rep := &Report{Prefix: layout.WALPrefix(), Problems: []Problem{}}
	var objs []object
	err := lister.List(ctx, layout.WALPrefix(), func(ob sinks.Object) error {
		rep.Objects++
		rep.Bytes += ob.Size
		name := path.Base(ob.Key)
		if name == path.Base(layout.IdentityKey()) {
			return nil
		}
		file, codec := compress.SplitExt(name)
		obj := object{key: ob.Key, file: file, codec: codec, size: ob.Size}
		switch {
		case strings.HasSuffix(file, ".history") && len(file) == 16:
			t, err := strconv.ParseUint(file[:8], 16, 32)
			if err != nil {
				rep.Problems = append(rep.Problems, Problem{ob.Key, "not a WAL file name"})
				return nil
			}
			obj.kind, obj.history = pipeline.KindHistory, uint32(t)
		case pipeline.IsSegmentName(strings.TrimSuffix(file, ".partial")):
			obj.kind = pipeline.KindSegment
			if strings.HasSuffix(file, ".partial") {
				obj.kind = pipeline.KindPartial
			}
		default:
			rep.Problems = append(rep.Problems, Problem{ob.Key, "not a WAL file name"})
			return nil
		}
		objs = append(objs, obj)
		return nil
	})
	if err != nil {
		return nil, err
	}
	// The identity object says whose archive this is; without it fetch
	// refuses to answer "not found" (a wrong --server or prefix looks
	// like an empty archive).
	id, err := sinks.ReadIdentity(ctx, sink, layout)
	switch {
	case errors.Is(err, sinks.ErrNoIdentity):
		rep.Problems = append(rep.Problems, Problem{layout.IdentityKey(),
			"no identity object: nothing was archived here, or --dest, --server or --layout is wrong; fetch aborts recovery instead of answering \"not found\" from it"})
	case err != nil:
		return nil, err
	}
	size := o.SegmentSize
	if size == 0 && pipeline.SegmentSize(id.SegmentSize).Validate() == nil {
		size = pipeline.SegmentSize(id.SegmentSize)
	}
	if size == 0 {
		size = segmentSizeOf(ctx, sink, objs)
	}
	if size == 0 {
		if len(objs) == 0 {
			return rep, nil
		}
		return nil, errors.New("cannot tell the WAL segment size: no identity object and no segment metadata; pass --segment-size")
	}
	rep.SegmentSize = uint64(size)
	for i := range objs {
		if objs[i].kind == pipeline.KindHistory {
			continue
		}
		seg, err := pipeline.ParseSegmentName(strings.TrimSuffix(objs[i].file, ".partial"), size)
		if err != nil {
			rep.Problems = append(rep.Problems, Problem{objs[i].key, err.Error()})
			objs[i].kind = ""
			continue
		}
		objs[i].seg = seg
	}
	rep.Timelines = timelines(objs, size)
	want := Expect{SystemID: id.SystemID, SegmentSize: size}
	rep.Problems = append(rep.Problems, historyChain(ctx, sink, objs, rep.Timelines, want, o.Identities)...)
	if err := verifyRanges(ctx, sink, layout, objs, rep, want, o); err != nil {
		return nil, err
	}
	if o.Metadata || o.Deep {
		rep.Problems = append(rep.Problems, checkObjects(ctx, sink, objs, want, o, &rep.Checked)...)
	}
	sort.Slice(rep.Problems, func(i, j int) bool { return rep.Problems[i].Key < rep.Problems[j].Key })
	return rep, nil
}

// segmentSizeOf reads the segment size from a segment's raw-size metadata.
func segmentSizeOf(ctx context.Context, sink sinks.Sink, objs []object) pipeline.SegmentSize {
	for _, ob := range objs {
		if ob.kind != pipeline.KindSegment {
			continue
		}
		if m, err := sink.Head(ctx, ob.key); err == nil && pipeline.SegmentSize(m.RawSize).Validate() == nil {
			return pipeline.SegmentSize(m.RawSize)
		}
	}
	return 0
}

func timelines(objs []object, size pipeline.SegmentSize) []Timeline {
	byTLI := map[uint32]*Timeline{}
	nums := map[uint32][]uint64{}
	get := func(t uint32) *Timeline {
		if byTLI[t] == nil {
			byTLI[t] = &Timeline{Timeline: t}
		}
		return byTLI[t]
	}
	for _, ob := range objs {
		switch ob.kind {
		case pipeline.KindHistory:
			get(ob.history).History = true
		case pipeline.KindSegment:
			nums[ob.seg.Timeline] = append(nums[ob.seg.Timeline], ob.seg.No)
			get(ob.seg.Timeline).Segments++
		case pipeline.KindPartial:
			tl := get(ob.seg.Timeline)
			tl.Partial = append(tl.Partial, ob.file)
		}
	}
	var out []Timeline
	for t, tl := range byTLI {
		ns := nums[t]
		sort.Slice(ns, func(i, j int) bool { return ns[i] < ns[j] })
		if len(ns) > 0 {
			tl.First = pipeline.Segment{Timeline: t, No: ns[0]}.Name(size)
			tl.Last = pipeline.Segment{Timeline: t, No: ns[len(ns)-1]}.Name(size)
		}
		for i := 1; i < len(ns); i++ {
			if ns[i] > ns[i-1]+1 {
				tl.Gaps = append(tl.Gaps, Gap{
					From:  pipeline.Segment{Timeline: t, No: ns[i-1] + 1}.Name(size),
					To:    pipeline.Segment{Timeline: t, No: ns[i] - 1}.Name(size),
					Count: ns[i] - ns[i-1] - 1,
				})
			}
		}
		out = append(out, *tl)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Timeline < out[j].Timeline })
	return out
}

// historyChain checks each history file: it parses, its parent timelines
// are older, and the archive holds the parent's WAL up to the switch point
// (as a segment or a .partial).
func historyChain(ctx context.Context, sink sinks.Sink, objs []object, tls []Timeline, want Expect, ids []age.Identity) []Problem {
	size := want.SegmentSize
	have := map[pipeline.Segment]bool{}
	for _, ob := range objs {
		if ob.kind == pipeline.KindSegment || ob.kind == pipeline.KindPartial {
			have[ob.seg] = true
		}
	}
	var probs []Problem
	for _, ob := range objs {
		if ob.kind != pipeline.KindHistory {
			continue
		}
		rc, meta, err := sink.Get(ctx, ob.key)
		if err != nil {
			probs = append(probs, Problem{ob.key, "cannot read: " + err.Error()})
			continue
		}
		body, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			probs = append(probs, Problem{ob.key, "cannot read: " + err.Error()})
			continue
		}
		if meta.Encryption != "" && len(ids) == 0 {
			continue // encrypted: checked with --decrypt-identity
		}
		raw, err := open(ob.key, ob.codec, body, meta, ids)
		if err != nil {
			probs = append(probs, Problem{ob.key, err.Error()})
			continue
		}
		if _, err := Check(ob.file, raw, meta, want); err != nil {
			probs = append(probs, Problem{ob.key, err.Error()})
			continue
		}
		entries, err := ParseHistory(raw)
		if err != nil {
			probs = append(probs, Problem{ob.key, err.Error()})
			continue
		}
		if len(entries) == 0 || entries[len(entries)-1].Parent >= ob.history {
			probs = append(probs, Problem{ob.key, "history does not end with an older parent timeline"})
			continue
		}
		last := entries[len(entries)-1]
		// The parent timeline must be archived up to the switch point.
		switchSeg := pipeline.SegmentOf(last.Parent, last.Switch-1, size)
		hasParentWAL := false
		for _, tl := range tls {
			if tl.Timeline == last.Parent && tl.Segments+len(tl.Partial) > 0 {
				hasParentWAL = true
			}
		}
		if hasParentWAL && !have[switchSeg] {
			probs = append(probs, Problem{ob.key, fmt.Sprintf("timeline %d switched from %d at %s, but segment %s of timeline %d is not archived",
				ob.history, last.Parent, last.Switch, switchSeg.Name(size), last.Parent)})
		}
	}
	return probs
}

// HistoryEntry is one line of a timeline history file.
type HistoryEntry struct {
	Parent uint32
	Switch pipeline.LSN
	Reason string
}

// ParseHistory parses a timeline history file: "parent<TAB>switch LSN<TAB>reason" lines.
func ParseHistory(b []byte) ([]HistoryEntry, error) {
	var out []HistoryEntry
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 2 {
			return nil, fmt.Errorf("history line %q: want parent timeline and switch point", line)
		}
		p, err := strconv.ParseUint(f[0], 10, 32)
		if err != nil {
			return nil, fmt.Errorf("history line %q: bad timeline", line)
		}
		l, err := pipeline.ParseLSN(f[1])
		if err != nil {
			return nil, fmt.Errorf("history line %q: %v", line, err)
		}
		out = append(out, HistoryEntry{Parent: uint32(p), Switch: l, Reason: strings.Join(f[2:], " ")})
	}
	return out, nil
}

// checkObjects checks each WAL object's metadata against its name, and with
// Deep, downloads and verifies it.
func checkObjects(ctx context.Context, sink sinks.Sink, objs []object, want Expect, o VerifyOptions, checked *int) []Problem {
	size := want.SegmentSize
	// Deep checks apply fetch's rules, against the identity read above.
	f := &Fetcher{Sink: sink, Identities: o.Identities, identity: &sinks.Identity{SystemID: want.SystemID, SegmentSize: uint64(size)}}
	par := max(o.Parallel, 1)
	var mu sync.Mutex
	var probs []Problem
	var done atomic.Int64
	var wg sync.WaitGroup
	sem := make(chan struct{}, par)
	add := func(key, format string, args ...any) {
		mu.Lock()
		probs = append(probs, Problem{key, fmt.Sprintf(format, args...)})
		mu.Unlock()
	}
	total := 0
	for _, ob := range objs {
		if ob.kind == pipeline.KindSegment || ob.kind == pipeline.KindPartial {
			total++
		}
	}
	for _, ob := range objs {
		if ob.kind != pipeline.KindSegment && ob.kind != pipeline.KindPartial {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			defer func() {
				n := done.Add(1)
				if o.Progress != nil {
					o.Progress(int(n), total)
				}
			}()
			meta, err := sink.Head(ctx, ob.key)
			if err != nil {
				add(ob.key, "cannot read metadata: %v", err)
				return
			}
			switch {
			case meta.SHA256 == "":
				add(ob.key, "no walship-sha256 metadata")
				return
			case meta.StartLSN != ob.seg.StartLSN(size).String():
				add(ob.key, "metadata start LSN %s, name says %s", meta.StartLSN, ob.seg.StartLSN(size))
			case meta.Timeline != ob.seg.Timeline:
				add(ob.key, "metadata timeline %d, name says %d", meta.Timeline, ob.seg.Timeline)
			case ob.kind == pipeline.KindSegment && meta.EndLSN != ob.seg.EndLSN(size).String():
				add(ob.key, "metadata end LSN %s, name says %s", meta.EndLSN, ob.seg.EndLSN(size))
			case meta.Codec != "" && meta.Codec != string(ob.codec):
				add(ob.key, "metadata codec %s, extension says %s", meta.Codec, ob.codec)
			case meta.Encryption != "" && meta.Encryption != crypt.Scheme:
				add(ob.key, "metadata walship-encryption %q: not a scheme this walship knows", meta.Encryption)
			case want.SystemID != "" && meta.SystemID != want.SystemID:
				add(ob.key, "metadata system id %q, the archive's identity says %s", meta.SystemID, want.SystemID)
			}
			if !o.Deep {
				return
			}
			if _, err := f.Download(ctx, Found{File: ob.file, Key: ob.key, Codec: ob.codec, Meta: meta}); err != nil {
				add(ob.key, "%v", err)
				return
			}
			mu.Lock()
			*checked++
			mu.Unlock()
		}()
	}
	wg.Wait()
	return probs
}
