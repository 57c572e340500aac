#!/usr/bin/env bash
# Builds the test bed's monitoring components from the Go module proxy, cached by version:
#   $NODELET_TEST_CACHE/metrics-server-<version>/bin/metrics-server   (sigs.k8s.io/metrics-server, `kubectl top`)
#   $NODELET_TEST_CACHE/metrics-server-<version>/bin/promcheck        (prometheus/common's text parser and
#                                                                       client_golang's promlint, as `promtool
#                                                                       check metrics` runs them)
# A warm run returns at once; a cold one takes ~2-3 minutes on 2 cores with the Go build cache of the control plane.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../versions.env"
VERSION=$METRICS_SERVER_VERSION
CACHE=${NODELET_TEST_CACHE:-/var/cache/nodelet-test}
OUT=$CACHE/metrics-server-$VERSION
BIN=$OUT/bin
if [ -x "$BIN/metrics-server" ] && [ -x "$BIN/promcheck" ]; then echo "$BIN"; exit 0; fi

export GOMODCACHE=${GOMODCACHE:-$CACHE/go/mod} GOCACHE=${GOCACHE:-$CACHE/go/build} GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0
mkdir -p "$BIN" "$OUT/promcheck"
echo "building metrics-server $VERSION and promcheck into $BIN" >&2
GOBIN=$BIN go install -trimpath -ldflags "-s -w" "sigs.k8s.io/metrics-server/cmd/metrics-server@$VERSION"

# promcheck: reads the text exposition format on stdin; exits 1 with the parser's or the linter's complaint.
cd "$OUT/promcheck"
cat > main.go <<'GO'
package main

import (
	"bytes"
	"fmt"
	"io"
	"os"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

func main() {
	text, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(bytes.NewReader(text))
	if err != nil {
		fmt.Fprintln(os.Stderr, "parse:", err)
		os.Exit(1)
	}
	problems, err := promlint.New(bytes.NewReader(text)).Lint()
	if err != nil {
		fmt.Fprintln(os.Stderr, "lint:", err)
		os.Exit(1)
	}
	for _, p := range problems {
		fmt.Printf("lint: %s: %s\n", p.Metric, p.Text)
	}
	samples := 0
	for _, f := range families {
		samples += len(f.Metric)
	}
	fmt.Printf("ok: %d families, %d samples\n", len(families), samples)
}
GO
[ -f go.mod ] || go mod init nodelet.test/promcheck >/dev/null 2>&1
go get github.com/prometheus/client_golang@v1.24.0 github.com/prometheus/common@v0.70.0 >/dev/null 2>&1
go mod tidy >/dev/null 2>&1
go build -trimpath -ldflags "-s -w" -o "$BIN/promcheck" .
[ -x "$BIN/metrics-server" ] && [ -x "$BIN/promcheck" ] || { echo "metrics-server build incomplete" >&2; exit 1; }
echo "$BIN"
