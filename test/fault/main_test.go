package fault

import (
	"fmt"
	"os"
	"testing"

	"github.com/outboxd/outboxd/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// scenario is one row of the matrix.
type scenario struct {
	name string
	run  func(t *testing.T)
}

// scenarios is the matrix, in the order of issue 5's list.
var scenarios = []scenario{
	{"kill9-after-2xx-before-mark", scenarioKillBeforeMark},
	{"kill9-after-mark-before-status", scenarioKillAfterMark},
	{"kill9-during-catchup", scenarioKillDuringCatchup},
	{"kill9-during-catchup-slow-receiver", scenarioKillDuringCatchupSlowReceiver},
	{"sigterm-mid-batch", scenarioSigterm},
	{"pg-stop-immediate", scenarioPostgresImmediate},
	{"pg-stop-fast-attached", scenarioPostgresFast},
	{"proxy-close-rst", func(t *testing.T) { scenarioProxyClose(t, true) }},
	{"proxy-close-fin", func(t *testing.T) { scenarioProxyClose(t, false) }},
	{"proxy-blackhole", scenarioBlackHole},
	{"proxy-cut-mid-transaction", func(t *testing.T) { scenarioCutMidTransaction(t, false) }},
	{"pg-restart-mid-transaction", func(t *testing.T) { scenarioCutMidTransaction(t, true) }},
	{"receiver-500s", scenarioReceiver500},
	{"receiver-timeouts", scenarioReceiverTimeouts},
	{"receiver-slow-2xx", scenarioReceiverSlow2xx},
	{"receiver-429-retry-after", scenarioReceiver429},
	{"receiver-down", scenarioReceiverDown},
	{"redirect-not-followed", scenarioRedirect},
	{"slot-dropped-while-stopped", scenarioSlotDropped},
	{"slot-invalidated-while-stopped", scenarioSlotInvalidatedStopped},
	{"slot-invalidated-while-streaming", scenarioSlotInvalidatedStreaming},
	{"bad-rows-and-alter-table", scenarioBadRows},
	{"big-transaction", scenarioBigTransaction},
	{"insert-select-cancelled", scenarioCancelledInsert},
	{"long-txn-across-restart", scenarioLongTxn},
	{"prepared-transactions", scenarioPrepared},
	{"catchup-commit-order", scenarioCatchupCommitOrder},
	{"restart-recreates-slot-open-txn", scenarioRecreateWaitsForOpenTxn},
	{"two-instances-one-slot", scenarioTwoInstances},
	{"wal-sender-timeout-stall", scenarioWalSenderTimeout},
	{"leader-cut-standby-takes-over", scenarioLeaderCutStandbyTakesOver},
	{"first-start-postgres-down", scenarioFirstStartPostgresDown},
	{"first-start-cut-check-schema", scenarioFirstStartCut("has_schema_privilege", false)},
	{"first-start-cut-read-namespace", scenarioFirstStartCut("SELECT namespace FROM", false)},
	{"first-start-cut-create-slot", scenarioFirstStartCut("CREATE_REPLICATION_SLOT", false)},
	{"first-start-cut-import-snapshot", scenarioFirstStartCut("SET TRANSACTION SNAPSHOT", false)},
	{"first-start-cut-open-cursor", scenarioFirstStartCut("DECLARE outboxd_catchup", false)},
	{"first-start-cut-load-parked", scenarioFirstStartCut("ordering_key, count(*)", false)},
	{"first-start-cut-start-replication", scenarioFirstStartCut("START_REPLICATION", false)},
	{"first-start-cut-fetch", scenarioFirstStartCut("FETCH", false)},
}

// TestFault runs the matrix, scenarios in parallel (bounded by -parallel),
// and prints the table when all have finished.
func TestFault(t *testing.T) {
	t.Cleanup(func() {
		table := summary()
		t.Log("\n" + table)
		fmt.Println(table)
		if path := os.Getenv("OUTBOXD_FAULT_REPORT"); path != "" {
			if err := os.WriteFile(path, []byte(table), 0o644); err != nil {
				t.Errorf("write %s: %v", path, err)
			}
		}
	})
	// Every scenario on every selected PostgreSQL major (OUTBOXD_TEST_PG_MAJORS;
	// the default binaries' major when unset): subtests pgNN/<scenario>.
	pgtest.ForEachMajor(t, func(t *testing.T) {
		for _, sc := range scenarios {
			t.Run(sc.name, func(t *testing.T) {
				t.Parallel()
				sc.run(t)
			})
		}
	})
}
