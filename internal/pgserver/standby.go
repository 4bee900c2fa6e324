package pgserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/jackc/pgx/v5"
)

// The physical standby of a running cluster, for failover tests: a base
// backup with the low-level API (the server packages on some systems have no
// pg_basebackup), standby.signal, and primary_conninfo pointing at the
// primary. See "Making a Base Backup Using the Low Level API" in the
// PostgreSQL documentation.

// skipFiles and emptyDirs are what a base backup leaves out: the files of the running
// server, and directories whose contents the server rebuilds (the directories
// are kept, empty). postgres.log is this package's server log.
var (
	skipFiles = map[string]bool{"postmaster.pid": true, "postmaster.opts": true, "postgres.log": true,
		"backup_label": true, "tablespace_map": true, "standby.signal": true, "recovery.signal": true}
	emptyDirs = map[string]bool{"pg_wal": true, "pg_replslot": true, "pg_dynshmem": true, "pg_notify": true,
		"pg_serial": true, "pg_snapshots": true, "pg_stat_tmp": true, "pg_subtrans": true}
)

// baseBackup fills in.dataDir with a base backup of the running primary and
// makes it a standby of it: pg_backup_start on one session, a file copy,
// pg_backup_stop on the same session, whose backup_label (and tablespace_map)
// go into the copy. The WAL the standby needs from the backup's start comes
// by streaming: the primary must keep it (a physical slot named in
// primary_slot_name, created before the backup).
func (in *Instance) baseBackup(primary *Instance) error {
	ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, primary.adminURL())
	if err != nil {
		return fmt.Errorf("base backup: connect to the primary: %w", err)
	}
	defer conn.Close(context.Background()) //nolint:errcheck // ends the backup if still running
	if _, err := conn.Exec(ctx, "SELECT pg_backup_start('outboxd standby', true)"); err != nil {
		return fmt.Errorf("base backup: pg_backup_start: %w", err)
	}
	if err := copyDataDir(primary.dataDir, in.dataDir); err != nil {
		return fmt.Errorf("base backup: copy %s: %w", primary.dataDir, err)
	}
	var label, spcmap string
	if err := conn.QueryRow(ctx, "SELECT labelfile, coalesce(spcmapfile, '') FROM pg_backup_stop(false)").Scan(&label, &spcmap); err != nil {
		return fmt.Errorf("base backup: pg_backup_stop: %w", err)
	}
	if err := os.WriteFile(filepath.Join(in.dataDir, "backup_label"), []byte(label), 0o600); err != nil {
		return fmt.Errorf("base backup: %w", err)
	}
	if spcmap != "" {
		if err := os.WriteFile(filepath.Join(in.dataDir, "tablespace_map"), []byte(spcmap), 0o600); err != nil {
			return fmt.Errorf("base backup: %w", err)
		}
	}
	if err := os.WriteFile(filepath.Join(in.dataDir, "standby.signal"), nil, 0o600); err != nil {
		return fmt.Errorf("base backup: %w", err)
	}
	if in.cred == nil {
		return nil
	}
	return filepath.WalkDir(in.dataDir, func(path string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return in.chown(path)
	})
}

// adminURL is a superuser's URL of the postgres database.
func (in *Instance) adminURL() string {
	return fmt.Sprintf("postgres://%s@127.0.0.1:%d/postgres?sslmode=disable&connect_timeout=5", Superuser, in.port)
}

// copyDataDir copies a running cluster's data directory. Files may change or
// vanish while it runs (the backup_label's WAL replay makes up for it): one
// that is gone when it is read is skipped.
func copyDataDir(src, dst string) error {
	return filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		name := d.Name()
		switch {
		case d.IsDir():
			if err := os.MkdirAll(target, 0o700); err != nil {
				return err
			}
			if rel != "." && emptyDirs[rel] {
				if rel == "pg_wal" {
					if err := os.MkdirAll(filepath.Join(target, "archive_status"), 0o700); err != nil {
						return err
					}
				}
				return fs.SkipDir
			}
			return nil
		case rel == name && skipFiles[name], strings.HasPrefix(name, "pgsql_tmp"):
			return nil
		case !d.Type().IsRegular():
			return nil // no tablespaces here: no symbolic links to follow
		}
		return copyFile(path, target)
	})
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
