//go:build unix

package unpack

import "syscall"

const noFollow = syscall.O_NOFOLLOW
