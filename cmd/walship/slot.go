package main

import (
	"context"
	"fmt"
	"io"

	"github.com/walship/walship/pipeline/receiver"
)

func cmdSlot(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) == 0 || (args[0] != "create" && args[0] != "drop") {
		return fmt.Errorf("%w: use 'walship slot create' or 'walship slot drop'", errUsage)
	}
	action := args[0]
	c, _, _, err := setup("slot "+action, args[1:], gPG|gSlot|gCommon, stdout)
	if err != nil {
		return err
	}
	cfg, err := receiver.ConnConfig(c.PG, c.AppName, "true")
	if err != nil {
		return err
	}
	conn, err := receiver.Connect(ctx, cfg)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	if action == "create" {
		if err := receiver.CreateSlot(ctx, conn, c.Slot, c.IfNotExists); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "replication slot %q ready\n", c.Slot)
		return nil
	}
	if err := receiver.DropSlot(ctx, conn, c.Slot, c.IfExists); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "replication slot %q dropped\n", c.Slot)
	return nil
}
