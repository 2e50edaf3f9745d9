package restore

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"strconv"
	"testing"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
)

const testSysID = 7349000000000000001

// walBuilder writes WAL records into a segment as PostgreSQL lays them
// out: page headers every 8 kB (long on the first page), records 8-byte
// aligned, a record that crosses a page continued after the next page's
// header with XLP_FIRST_IS_CONTRECORD and the remaining length.
type walBuilder struct {
	data  []byte
	seg   pipeline.Segment
	size  pipeline.SegmentSize
	sysid uint64
	p     int // next write offset
}

func newWAL(seg pipeline.Segment, size pipeline.SegmentSize, sysid uint64) *walBuilder {
	b := &walBuilder{data: make([]byte, size), seg: seg, size: size, sysid: sysid}
	b.header(0, 0)
	b.p = longPageHdr
	return b
}

func (b *walBuilder) header(off int, rem int) {
	p := b.data[off:]
	binary.LittleEndian.PutUint16(p[0:], 0xD110)
	info := uint16(0)
	if rem > 0 {
		info |= xlpContRecord
	}
	if off == 0 {
		info |= xlpLongHeader
		binary.LittleEndian.PutUint64(p[24:], b.sysid)
		binary.LittleEndian.PutUint32(p[32:], uint32(b.size))
		binary.LittleEndian.PutUint32(p[36:], walPageSize)
	}
	binary.LittleEndian.PutUint16(p[2:], info)
	binary.LittleEndian.PutUint32(p[4:], b.seg.Timeline)
	binary.LittleEndian.PutUint64(p[8:], uint64(b.seg.StartLSN(b.size))+uint64(off))
	binary.LittleEndian.PutUint32(p[16:], uint32(rem))
}

// record appends a record of total length n (header included) with the
// given resource manager and info; it reports false when it ran past the
// segment's end.
func (b *walBuilder) record(n int, rmid, info byte) bool {
	hdr := make([]byte, n)
	binary.LittleEndian.PutUint32(hdr[0:], uint32(n))
	hdr[16], hdr[17] = info, rmid
	for i := recordHdr; i < n; i++ {
		hdr[i] = byte(i) | 1
	}
	left := hdr
	for len(left) > 0 {
		if b.p >= len(b.data) {
			return false
		}
		if b.p%walPageSize == 0 {
			rem := 0
			if len(left) < len(hdr) {
				rem = len(left)
			}
			b.header(b.p, rem)
			b.p += shortPageHdr
		}
		k := copy(b.data[b.p:(b.p/walPageSize+1)*walPageSize], left)
		left = left[k:]
		b.p += k
	}
	b.p = align8(b.p)
	return true
}

// fill appends records until the segment is full; the last one continues
// into the next segment.
func (b *walBuilder) fill() []byte {
	for i := 0; b.record(100+i%3000, 10, 0); i++ {
	}
	return b.data
}

// fakeSegment is a complete segment of fake records from testSysID.
func fakeSegment(seg pipeline.Segment, size pipeline.SegmentSize) []byte {
	return newWAL(seg, size, testSysID).fill()
}

// segMeta is the metadata the archiver writes for raw as file.
func segMeta(seg pipeline.Segment, size pipeline.SegmentSize, raw []byte, end pipeline.LSN) sinks.Metadata {
	sum := sha256.Sum256(raw)
	if end == 0 {
		end = seg.EndLSN(size)
	}
	return sinks.Metadata{SHA256: pipeline.SHA256Hex(sum[:]), StartLSN: seg.StartLSN(size).String(), EndLSN: end.String(),
		Timeline: seg.Timeline, SystemID: strconv.FormatUint(testSysID, 10), Codec: "zstd", RawSize: int64(len(raw))}
}

// archive is a file-sink archive with an identity object, for tests.
type archive struct {
	t      *testing.T
	sink   sinks.Sink
	layout sinks.Layout
	enc    *compress.Encoder
}

func (a *archive) put(file string, raw []byte, meta sinks.Metadata) {
	a.t.Helper()
	body, err := a.enc.Encode(raw)
	if err != nil {
		a.t.Fatal(err)
	}
	if err := a.sink.Put(context.Background(), a.layout.Key(file, ".zst"), append([]byte(nil), body...), meta); err != nil {
		a.t.Fatal(err)
	}
}

func (a *archive) identity(sysid uint64, size pipeline.SegmentSize) {
	a.t.Helper()
	id := sinks.Identity{SystemID: strconv.FormatUint(sysid, 10), SegmentSize: uint64(size), Server: "s"}
	if err := a.sink.Put(context.Background(), a.layout.IdentityKey(), id.Body(), sinks.Metadata{Codec: "none"}); err != nil {
		a.t.Fatal(err)
	}
}

func (a *archive) fetcher() *Fetcher {
	return &Fetcher{Sink: a.sink, Layout: a.layout, Codecs: compress.Codecs(), SystemID: strconv.FormatUint(testSysID, 10)}
}
