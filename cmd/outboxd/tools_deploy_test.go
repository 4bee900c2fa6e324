package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"
)

// The deployment kit (deploy/, docker-compose.yml) is checked here: the YAML
// parses, has the services and containers the docs describe, and every
// OUTBOXD_* variable it sets exists in config and passes outboxd's own
// validation, so a renamed variable breaks this test rather than a
// deployment.

// deployRepoRoot is the repository root, from cmd/outboxd.
const deployRepoRoot = "../.."

// knownVars are the OUTBOXD_* variables config reads, with their defaults
// ("" when none).
func deployKnownVars() map[string]string {
	vars := map[string]string{}
	t := reflect.TypeOf(config{})
	for i := range t.NumField() {
		f := t.Field(i)
		if name := f.Tag.Get("env"); name != "" {
			vars[envPrefix+name] = f.Tag.Get("envDefault")
		}
	}
	return vars
}

func deployRequireKnownVar(t *testing.T, where, name string) {
	t.Helper()
	if !strings.HasPrefix(name, envPrefix) {
		return
	}
	_, ok := deployKnownVars()[name]
	require.True(t, ok || sinkVar(name), "%s sets %s, which outboxd does not read", where, name)
}

// requireValidRunConfig loads env as `outboxd run` would and builds the
// pipeline configuration from it.
func deployRequireValidRunConfig(t *testing.T, where string, env map[string]string) {
	t.Helper()
	c, warnings, err := loadConfig(env)
	require.NoError(t, err, where)
	require.Empty(t, warnings, where)
	_, err = c.pipelineConfig()
	require.NoError(t, err, where)
	_, err = c.logger(io.Discard)
	require.NoError(t, err, where)
}

// yamlDocs decodes every document of a YAML file (merge keys resolved).
func deployYAML(t *testing.T, path string) []map[string]any {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(deployRepoRoot, path))
	require.NoError(t, err)
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var docs []map[string]any
	for {
		var doc map[string]any
		err := dec.Decode(&doc)
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err, "%s: YAML syntax", path)
		if doc != nil {
			docs = append(docs, doc)
		}
	}
	require.NotEmpty(t, docs, path)
	return docs
}

// at walks a decoded YAML tree by map keys and list indexes.
func deployAt(t *testing.T, v any, path ...any) any {
	t.Helper()
	for i, p := range path {
		switch k := p.(type) {
		case string:
			m, ok := v.(map[string]any)
			require.True(t, ok, "at %v: not a mapping", path[:i+1])
			v, ok = m[k]
			require.True(t, ok, "at %v: missing", path[:i+1])
		case int:
			l, ok := v.([]any)
			require.True(t, ok, "at %v: not a list", path[:i+1])
			require.Less(t, k, len(l), "at %v", path[:i+1])
			v = l[k]
		}
	}
	return v
}

func deployStr(t *testing.T, v any, path ...any) string {
	t.Helper()
	s, ok := deployAt(t, v, path...).(string)
	require.True(t, ok, "at %v: not a string", path)
	return s
}

func deployStrList(t *testing.T, v any, path ...any) []string {
	t.Helper()
	var out []string
	switch l := deployAt(t, v, path...).(type) {
	case []any:
		for _, e := range l {
			out = append(out, fmt.Sprint(e))
		}
	case string:
		out = strings.Fields(l)
	default:
		t.Fatalf("at %v: not a list or string", path)
	}
	return out
}

func TestDockerComposeFile(t *testing.T) {
	docs := deployYAML(t, "docker-compose.yml")
	require.Len(t, docs, 1)
	services, ok := docs[0]["services"].(map[string]any)
	require.True(t, ok)
	for _, name := range []string{"postgres", "migrate", "outboxd", "receiver", "demo"} {
		require.Contains(t, services, name)
	}

	pg := services["postgres"]
	require.True(t, strings.HasPrefix(deployStr(t, pg, "image"), "postgres:15"))
	require.Contains(t, deployStrList(t, pg, "command"), "wal_level=logical")

	env := func(service string) map[string]string {
		out := map[string]string{}
		m, ok := deployAt(t, services, service, "environment").(map[string]any)
		require.True(t, ok, "%s: environment is a mapping", service)
		for k, v := range m {
			deployRequireKnownVar(t, "docker-compose.yml service "+service, k)
			out[k] = fmt.Sprint(v)
		}
		return out
	}
	for _, name := range []string{"migrate", "outboxd", "receiver"} {
		require.Equal(t, "deploy/Dockerfile", deployStr(t, services, name, "build", "dockerfile"), name)
		_, err := os.Stat(filepath.Join(deployRepoRoot, deployStr(t, services, name, "build", "context"), "deploy/Dockerfile"))
		require.NoError(t, err)
	}
	require.Equal(t, []string{"migrate"}, deployStrList(t, services, "migrate", "command"))
	require.Equal(t, "service_healthy", deployStr(t, services, "migrate", "depends_on", "postgres", "condition"))
	require.Equal(t, []string{"run"}, deployStrList(t, services, "outboxd", "command"))
	require.Equal(t, "service_completed_successfully", deployStr(t, services, "outboxd", "depends_on", "migrate", "condition"))
	require.Equal(t, "service_completed_successfully", deployStr(t, services, "demo", "depends_on", "migrate", "condition"))

	// outboxd's settings pass its own validation, and point at the receiver
	// with the receiver's secret.
	run := env("outboxd")
	deployRequireValidRunConfig(t, "docker-compose.yml outboxd", run)
	require.Contains(t, run["OUTBOXD_DATABASE_URL"], "@postgres:5432/")
	require.Equal(t, env("migrate")["OUTBOXD_DATABASE_URL"], run["OUTBOXD_DATABASE_URL"])
	recvArgs := deployStrList(t, services, "receiver", "command")
	require.Equal(t, "receive", recvArgs[0])
	addr := recvArgs[len(recvArgs)-1]
	require.Equal(t, "--addr", recvArgs[len(recvArgs)-2])
	_, recvPort, err := net.SplitHostPort(addr)
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(run["OUTBOXD_WEBHOOK_URL"], "http://receiver:"+recvPort+"/"), run["OUTBOXD_WEBHOOK_URL"])
	require.Equal(t, run["OUTBOXD_WEBHOOK_SECRET"], env("receiver")["OUTBOXD_WEBHOOK_SECRET"])
	_, err = newHookVerifier([]string{run["OUTBOXD_WEBHOOK_SECRET"]}, time.Minute)
	require.NoError(t, err)

	// The demo inserts into the outbox table from the postgres image.
	require.True(t, strings.HasPrefix(deployStr(t, services, "demo", "image"), "postgres:"))
	script := strings.Join(deployStrList(t, services, "demo", "command"), " ")
	require.Contains(t, script, "INSERT INTO domain_event")
	require.Contains(t, script, "outboxd_emit(")
	require.NotRegexp(t, `[^$]\$[a-z(]`, script, "shell variables are written $$ in compose files")

	// Published ports stay on loopback.
	for name := range services {
		if ports, ok := deployAt(t, services, name).(map[string]any)["ports"]; ok {
			for _, p := range ports.([]any) {
				require.True(t, strings.HasPrefix(fmt.Sprint(p), "127.0.0.1:"), "%s publishes %v beyond loopback", name, p)
			}
		}
	}
}

// k8sContainer checks one outboxd container of a manifest and returns its
// environment (secret references replaced by placeholders that pass
// validation).
func k8sContainer(t *testing.T, where string, c any, secretKeys map[string]bool) map[string]string {
	t.Helper()
	env := map[string]string{}
	list, _ := deployAt(t, c, "env").([]any)
	for _, e := range list {
		name := deployStr(t, e, "name")
		deployRequireKnownVar(t, where, name)
		m := e.(map[string]any)
		if v, ok := m["value"]; ok {
			env[name] = fmt.Sprint(v)
			continue
		}
		if ref, ok := deployAt(t, e, "valueFrom").(map[string]any)["secretKeyRef"]; ok {
			key := deployStr(t, ref, "key")
			require.True(t, secretKeys[deployStr(t, ref, "name")+"/"+key], "%s: %s refers to a key the example Secret does not have", where, name)
			switch name {
			case "OUTBOXD_DATABASE_URL":
				env[name] = "postgres://outboxd:x@db.internal:5432/app?sslmode=verify-full"
			case "OUTBOXD_WEBHOOK_SECRET":
				env[name] = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
			default:
				env[name] = "x"
			}
		}
	}
	res := deployAt(t, c, "resources")
	require.NotEmpty(t, deployAt(t, res, "requests", "memory"), where)
	require.NotEmpty(t, deployAt(t, res, "limits", "memory"), where)
	require.Equal(t, false, deployAt(t, c, "securityContext", "allowPrivilegeEscalation"), where)
	return env
}

// k8sProbes checks liveness /healthz and readiness /readyz on the port of
// OUTBOXD_HTTP_ADDR, which must listen beyond loopback for the kubelet.
func k8sProbes(t *testing.T, where string, c any, env map[string]string) {
	t.Helper()
	host, port, err := net.SplitHostPort(env["OUTBOXD_HTTP_ADDR"])
	require.NoError(t, err, "%s: OUTBOXD_HTTP_ADDR", where)
	require.Equal(t, "0.0.0.0", host, "%s: the kubelet probes the pod IP", where)
	portName := deployStr(t, c, "livenessProbe", "httpGet", "port")
	require.Equal(t, "/healthz", deployStr(t, c, "livenessProbe", "httpGet", "path"), where)
	require.Equal(t, "/readyz", deployStr(t, c, "readinessProbe", "httpGet", "path"), where)
	require.Equal(t, portName, deployStr(t, c, "readinessProbe", "httpGet", "port"), where)
	found := false
	for _, p := range deployAt(t, c, "ports").([]any) {
		if deployStr(t, p, "name") == portName {
			require.Equal(t, port, fmt.Sprint(deployAt(t, p, "containerPort")), where)
			found = true
		}
	}
	require.True(t, found, "%s: probe port %s is declared", where, portName)
}

func k8sSecretKeys(t *testing.T) map[string]bool {
	keys := map[string]bool{}
	for _, doc := range deployYAML(t, "deploy/k8s/secret.example.yaml") {
		require.Equal(t, "Secret", doc["kind"])
		for k := range deployAt(t, doc, "stringData").(map[string]any) {
			keys[deployStr(t, doc, "metadata", "name")+"/"+k] = true
		}
	}
	return keys
}

func k8sByKind(t *testing.T, path string) map[string]map[string]any {
	t.Helper()
	out := map[string]map[string]any{}
	for _, doc := range deployYAML(t, path) {
		require.NotEmpty(t, doc["apiVersion"], path)
		kind := deployStr(t, doc, "kind")
		require.NotEmpty(t, deployStr(t, doc, "metadata", "name"), path)
		require.NotContains(t, out, kind, "%s: one %s", path, kind)
		out[kind] = doc
	}
	return out
}

func TestKubernetesSidecar(t *testing.T) {
	secrets := k8sSecretKeys(t)
	docs := k8sByKind(t, "deploy/k8s/sidecar.yaml")
	spec := deployAt(t, docs["Deployment"], "spec", "template", "spec")
	var sidecar any
	for _, c := range deployAt(t, spec, "initContainers").([]any) {
		if deployStr(t, c, "name") == "outboxd" {
			sidecar = c
		}
	}
	require.NotNil(t, sidecar, "outboxd is an init container")
	require.Equal(t, "Always", deployStr(t, sidecar, "restartPolicy"), "restartPolicy Always makes it a native sidecar")
	require.Equal(t, []string{"run"}, deployStrList(t, sidecar, "args"))
	require.NotEmpty(t, deployAt(t, spec, "containers"), "next to an application container")
	env := k8sContainer(t, "sidecar.yaml", sidecar, secrets)
	k8sProbes(t, "sidecar.yaml", sidecar, env)
	deployRequireValidRunConfig(t, "sidecar.yaml", env)
}

func TestKubernetesDeployment(t *testing.T) {
	secrets := k8sSecretKeys(t)
	docs := k8sByKind(t, "deploy/k8s/deployment.yaml")
	dep := docs["Deployment"]
	require.Equal(t, 2, deployAt(t, dep, "spec", "replicas"), "two replicas: one streams, one stands by")
	containers := deployAt(t, dep, "spec", "template", "spec", "containers").([]any)
	require.Len(t, containers, 1)
	c := containers[0]
	require.Equal(t, []string{"run"}, deployStrList(t, c, "args"))
	env := k8sContainer(t, "deployment.yaml", c, secrets)
	k8sProbes(t, "deployment.yaml", c, env)
	deployRequireValidRunConfig(t, "deployment.yaml", env)

	job := deployAt(t, docs["Job"], "spec", "template", "spec", "containers", 0)
	require.Equal(t, []string{"migrate"}, deployStrList(t, job, "args"))
	jobEnv := k8sContainer(t, "deployment.yaml migrate job", job, secrets)
	c2, _, err := loadConfig(jobEnv)
	require.NoError(t, err)
	require.NoError(t, c2.requireDatabase())
	require.Contains(t, docs, "PodDisruptionBudget")
}

// deploy/outboxd.env.example lists every variable, with the default as the
// commented value, and nothing outboxd does not read.
func TestEnvExampleListsEveryVariable(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(deployRepoRoot, "deploy/outboxd.env.example"))
	require.NoError(t, err)
	line := regexp.MustCompile(`^(# )?(OUTBOXD_[A-Z0-9_]+)=(.*)$`)
	listed := map[string]bool{}
	set := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		m := line.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		name, value := m[2], m[3]
		deployRequireKnownVar(t, "outboxd.env.example", name)
		require.False(t, listed[name], "%s listed twice", name)
		listed[name] = true
		if m[1] != "" {
			def, known := deployKnownVars()[name]
			if known {
				require.Equal(t, def, value, "%s: the commented value is the default", name)
			}
		} else {
			set[name] = value
			require.NotContains(t, value, `"`, "%s: no quotes (docker --env-file takes them literally)", name)
		}
	}
	for name := range deployKnownVars() {
		require.True(t, listed[name], "outboxd.env.example does not list %s", name)
	}
	// An unedited copy refuses to start: the placeholder is not a secret.
	placeholder := set["OUTBOXD_WEBHOOK_SECRET"]
	require.Contains(t, placeholder, "CHANGE_ME")
	_, err = newHookVerifier([]string{placeholder}, time.Minute)
	require.Error(t, err)
	set["OUTBOXD_WEBHOOK_SECRET"] = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	deployRequireValidRunConfig(t, "outboxd.env.example", set)
}

func TestSystemdUnit(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(deployRepoRoot, "deploy/systemd/outboxd.service"))
	require.NoError(t, err)
	sections := map[string]map[string][]string{}
	var cur string
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		switch {
		case l == "" || strings.HasPrefix(l, "#"):
		case strings.HasPrefix(l, "[") && strings.HasSuffix(l, "]"):
			cur = l[1 : len(l)-1]
			sections[cur] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(l, "=")
			require.True(t, ok, "not key=value: %q", l)
			require.NotEmpty(t, cur, "%q outside a section", l)
			sections[cur][k] = append(sections[cur][k], v)
		}
	}
	svc := sections["Service"]
	require.NotNil(t, svc)
	require.Equal(t, []string{"/etc/outboxd/outboxd.env"}, svc["EnvironmentFile"])
	require.Equal(t, []string{"/usr/local/bin/outboxd run"}, svc["ExecStart"])
	for k, v := range map[string]string{"DynamicUser": "yes", "ProtectSystem": "strict", "NoNewPrivileges": "yes",
		"ProtectHome": "yes", "PrivateTmp": "yes", "RestartPreventExitStatus": "2", "KillSignal": "SIGTERM"} {
		require.Equal(t, []string{v}, svc[k], k)
	}
	require.Equal(t, []string{"multi-user.target"}, sections["Install"]["WantedBy"])
}

func TestDockerfile(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(deployRepoRoot, "deploy/Dockerfile"))
	require.NoError(t, err)
	// Join continuation lines, drop comments.
	var instr []string
	var cont string
	for _, l := range strings.Split(string(data), "\n") {
		l = strings.TrimSpace(l)
		if strings.HasPrefix(l, "#") || l == "" {
			continue
		}
		if strings.HasSuffix(l, `\`) {
			cont += strings.TrimSuffix(l, `\`) + " "
			continue
		}
		instr = append(instr, cont+l)
		cont = ""
	}
	var from []string
	var final []string // instructions of the last stage
	for _, in := range instr {
		if strings.HasPrefix(in, "FROM ") {
			from = append(from, in)
			final = nil
		}
		final = append(final, in)
		if strings.HasPrefix(in, "ENV ") {
			for _, f := range strings.Fields(strings.TrimPrefix(in, "ENV ")) {
				name, _, _ := strings.Cut(f, "=")
				deployRequireKnownVar(t, "deploy/Dockerfile", name)
			}
		}
	}
	require.Len(t, from, 2, "multi-stage")
	require.Regexp(t, `^FROM golang:1\.26\S* AS build$`, from[0])
	require.Regexp(t, `^FROM gcr\.io/distroless/static-debian12:nonroot$`, from[1])
	all := strings.Join(instr, "\n")
	require.Contains(t, all, "CGO_ENABLED=0")
	require.Contains(t, all, "-trimpath")
	require.Contains(t, all, `-ldflags "-s -w -X main.version=${VERSION}"`)
	last := strings.Join(final, "\n")
	require.Contains(t, last, "USER nonroot:nonroot")
	require.Regexp(t, `HEALTHCHECK .*CMD \["/usr/local/bin/outboxd", "healthcheck"\]`, last)
	require.Contains(t, last, `ENTRYPOINT ["/usr/local/bin/outboxd"]`)
	_, err = os.Stat(filepath.Join(deployRepoRoot, "deploy/Dockerfile.dockerignore"))
	require.NoError(t, err)
}
