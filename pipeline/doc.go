// Package pipeline holds walship's domain types: WAL positions, segment
// names, the events that travel between the receiver and the archivers, and
// the WAL page-header check. It imports nothing else from the project; the
// receiver, bus, archiver and sinks all speak in these types.
package pipeline
