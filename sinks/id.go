package sinks

import (
	"fmt"
	"net/url"
	"path"
	"strings"
)

// DestID names a destination in one canonical spelling, for archived events
// and for the receiver to compare with its own: "s3://bucket/prefix" (plus
// "?endpoint=<scheme://host[:port]>" for an S3-compatible server) or
// "file:///path". It never carries credentials.
func DestID(dest, s3Endpoint string) (string, error) {
	u, err := url.Parse(dest)
	if err != nil || u.Scheme == "" || u.Opaque != "" {
		return "", fmt.Errorf("malformed destination %q: use s3://bucket/prefix or file:///absolute/path", dest)
	}
	switch u.Scheme {
	case "file":
		if u.Path == "" {
			return "", fmt.Errorf("malformed destination %q: use file:///absolute/path", dest)
		}
		return "file://" + path.Clean("/"+u.Path), nil
	case "s3":
		if u.Host == "" {
			return "", fmt.Errorf("malformed destination %q: use s3://bucket/prefix", dest)
		}
		id := "s3://" + u.Host
		if p := strings.Trim(path.Clean("/"+u.Path), "/"); p != "" {
			id += "/" + p
		}
		if s3Endpoint != "" {
			e, err := url.Parse(s3Endpoint)
			if err != nil || e.Host == "" {
				return "", fmt.Errorf("malformed S3 endpoint %q: use http(s)://host[:port]", s3Endpoint)
			}
			id += "?endpoint=" + e.Scheme + "://" + strings.ToLower(e.Host)
		}
		return id, nil
	}
	return "", fmt.Errorf("malformed destination %q: scheme %q; use s3://bucket/prefix or file:///absolute/path", dest, u.Scheme)
}
