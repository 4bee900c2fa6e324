package pgserver

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// EnvCache names the environment variable that overrides where
// scripts/install-postgres.sh put the server binaries of majors the system
// has no package for; see [CacheDir].
const EnvCache = "OUTBOXD_PG_CACHE"

// rootCacheDir is the cache as root. As root the servers run as user
// postgres, who must enter every directory on the way to the binaries: a
// cache under /root would be out of its reach, /var/cache is not.
const rootCacheDir = "/var/cache/outboxd-pg"

// CacheDir returns the directory that holds <major>/bin of the installed
// server binaries: $OUTBOXD_PG_CACHE, else /var/cache/outboxd-pg as root, else
// the user's cache directory (${XDG_CACHE_HOME:-$HOME/.cache}) + outboxd-pg.
// scripts/install-postgres.sh picks the same directory.
func CacheDir() (string, error) {
	if dir := os.Getenv(EnvCache); dir != "" {
		return dir, nil
	}
	if os.Geteuid() == 0 {
		return rootCacheDir, nil
	}
	dir, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("find the cache directory (or set %s): %w", EnvCache, err)
	}
	return filepath.Join(dir, "outboxd-pg"), nil
}

// BinDirFor finds the server binaries of one PostgreSQL major: Debian's
// /usr/lib/postgresql/<major>/bin, else <CacheDir>/<major>/bin. A directory
// counts only when its postgres reports that major, so a half-installed or
// misplaced one is passed over rather than started. The error names the
// script that installs the binaries.
func BinDirFor(major int) (string, error) {
	m := strconv.Itoa(major)
	candidates := []string{filepath.Join("/usr/lib/postgresql", m, "bin")}
	cache, cacheErr := CacheDir()
	if cacheErr == nil {
		candidates = append(candidates, filepath.Join(cache, m, "bin"))
	}
	var problems []error
	for _, dir := range candidates {
		if !isServerBinDir(dir) {
			continue
		}
		got, err := ServerMajor(dir)
		if err != nil {
			problems = append(problems, err)
			continue
		}
		if got != major {
			problems = append(problems, fmt.Errorf("%s holds PostgreSQL %d", dir, got))
			continue
		}
		return dir, nil
	}
	err := fmt.Errorf("no PostgreSQL %d server binaries (initdb, pg_ctl, postgres) in %s: install them with scripts/install-postgres.sh %d",
		major, strings.Join(candidates, " or "), major)
	if cacheErr != nil {
		problems = append(problems, cacheErr)
	}
	return "", errors.Join(append([]error{err}, problems...)...)
}

// versionRE takes the version from `postgres --version`: "postgres
// (PostgreSQL) 16.14", "... 15.18 (Debian 15.18-0+deb12u1)", "... 18beta1".
var versionRE = regexp.MustCompile(`\(PostgreSQL\) (\d+)`)

// ServerMajor returns the major of the server binaries in binDir, as their
// postgres --version reports it (which postgres answers also as root).
func ServerMajor(binDir string) (int, error) {
	cmd := exec.Command(filepath.Join(binDir, "postgres"), "--version")
	cmd.Env = childEnv()
	out, err := cmd.Output()
	if err != nil {
		var exitErr *exec.ExitError
		if errors.As(err, &exitErr) && len(exitErr.Stderr) > 0 {
			err = fmt.Errorf("%w: %s", err, strings.TrimSpace(string(exitErr.Stderr)))
		}
		return 0, fmt.Errorf("run %s --version: %w", filepath.Join(binDir, "postgres"), err)
	}
	return parseServerMajor(string(out))
}

func parseServerMajor(version string) (int, error) {
	version = strings.TrimSpace(version)
	match := versionRE.FindStringSubmatch(version)
	if match == nil {
		return 0, fmt.Errorf("parse server version %q: want postgres (PostgreSQL) N.M", version)
	}
	major, err := strconv.Atoi(match[1])
	if err != nil || major < 10 {
		// Before 10 the major had two numbers (9.6): too old for logical
		// replication with pgoutput anyway.
		return 0, fmt.Errorf("parse server version %q: unsupported major", version)
	}
	return major, nil
}

// ParseMajors parses a comma list of PostgreSQL majors such as "15,16,17,18"
// into majors in the order given, without repeats. Blank items are ignored;
// an empty list is an error, since whoever set one meant some majors.
func ParseMajors(list string) ([]int, error) {
	var majors []int
	for item := range strings.SplitSeq(list, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		major, err := strconv.Atoi(item)
		if err != nil || major < 10 {
			return nil, fmt.Errorf("parse majors %q: %q is not a PostgreSQL major (10 or later)", list, item)
		}
		if !slices.Contains(majors, major) {
			majors = append(majors, major)
		}
	}
	if len(majors) == 0 {
		return nil, fmt.Errorf("parse majors %q: no major given", list)
	}
	return majors, nil
}
