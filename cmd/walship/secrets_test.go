package main

import "testing"

func TestPGHasPassword(t *testing.T) {
	for conn, want := range map[string]bool{
		"postgres://u:pw@db/postgres":                  true,
		"postgresql://u@db/postgres?password=pw":       true,
		"postgres://u@db/postgres?sslmode=verify-full": false,
		"postgres://db1,db2/postgres":                  false,
		"host=db user=u password=pw":                   true,
		"host=db password = 'p w' user=u":              true,
		"password=pw":                                  true,
		"host=db user=u sslpassword_file=x":            false,
		"host=db user=u passfile=/x/.pgpass":           false,
		"":                                             false,
	} {
		if got := pgHasPassword(conn); got != want {
			t.Errorf("pgHasPassword(%q) = %v, want %v", conn, got, want)
		}
	}
	if !urlHasPassword("nats://a:4222,nats://u:p@b:4222") || urlHasPassword("nats://u@a:4222,tls://b:4222") {
		t.Error("urlHasPassword")
	}
}
