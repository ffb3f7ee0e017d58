"""docker-compose.yml stays a valid CeleryExecutor deployment (SPEC §8, issue 14).

The file is parsed with PyYAML (``safe_load`` resolves the ``&anchor``/``<<: *merge`` keys, as
Compose does) and checked for: the services of Airflow's official 3.x compose file, the image
built from our Dockerfile, the executor, broker and result backend, a cosell state DB apart from
Airflow's metadata DB, a scalable worker, and that every ``AIRFLOW__SECTION__KEY`` it names,
also in comments, is a real setting: Airflow's own and its providers' from Airflow's config
description, ours (``[cosell]``) from the keys the provider's code reads. Each check is a
function returning the problems it finds, so the tests below also show that a broken file fails.
"""

from __future__ import annotations

import ast
import copy
import re
import tomllib
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
PLUGIN_SOURCES = REPO / "plugins" / "cosell_sync"

AIRFLOW_SERVICES = (
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-init",
)
WORKER = "airflow-worker"
COSELL_SECTION = "cosell"
# An environment variable naming an Airflow setting: AIRFLOW__<SECTION>__<KEY>, optionally with
# the _CMD / _SECRET suffix Airflow accepts for sensitive settings.
SETTING_RE = re.compile(r"\bAIRFLOW__([A-Z0-9_.]+?)__([A-Z0-9_]+)\b")
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
DURATION_RE = re.compile(r"^(\d+(us|ms|s|m|h))+$")
# Compose interpolation: $$ (a literal $), ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?err}, $NAME.
INTERPOLATION_RE = re.compile(r"\$(\$|\{[A-Za-z_][A-Za-z0-9_]*(?:(?::?[-?+])[^}]*)?\}|[A-Za-z_][A-Za-z0-9_]*)")


# --------------------------------------------------------------------------- inputs


def load(text: str) -> dict[str, Any]:
    return yaml.safe_load(text)


@cache
def compose_text() -> str:
    return COMPOSE.read_text()


def compose() -> dict[str, Any]:
    return copy.deepcopy(_compose())


@cache
def _compose() -> dict[str, Any]:
    return load(compose_text())


@cache
def airflow_settings() -> dict[str, set[str]]:
    """Section -> keys of every setting Airflow and its installed providers (celery included) know."""
    from airflow.configuration import retrieve_configuration_description

    description = retrieve_configuration_description(include_providers=True)
    return {section: {key.lower() for key in body.get("options", {})} for section, body in description.items()}


def _is_cosell_section(node: ast.expr, aliases: set[str]) -> bool:
    return (isinstance(node, ast.Constant) and node.value == COSELL_SECTION) or (
        isinstance(node, ast.Name) and node.id in aliases
    )


def _key_pattern(node: ast.expr, params: list[str]) -> tuple[str, str] | str | None:
    """A literal key (str), a (prefix, parameter) pair when the key is built from a parameter of
    the enclosing function (``key`` or ``f"webhook_{key}"``), or None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and node.id in params:
        return ("", node.id)
    if (
        isinstance(node, ast.JoinedStr)
        and len(node.values) == 2
        and isinstance(node.values[0], ast.Constant)
        and isinstance(node.values[1], ast.FormattedValue)
        and isinstance(node.values[1].value, ast.Name)
        and node.values[1].value.id in params
    ):
        return (str(node.values[0].value), node.values[1].value.id)
    return None


def cosell_keys_in(source: str) -> set[str]:
    """The ``[cosell]`` keys one module reads: ``conf.get("cosell", "key")`` and the same through
    helpers of the module that pass a parameter on as the key (``_setting(key)`` -> ``_seconds(key)``,
    ``get(key)`` -> ``conf.get("cosell", f"webhook_{key}")``), called with a literal."""
    tree = ast.parse(source)
    aliases = {  # CONFIG_SECTION = "cosell"
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and node.value.value == COSELL_SECTION
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]

    def params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
        return [a.arg for a in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs)]

    def calls(node: ast.AST) -> list[ast.Call]:
        return [call for call in ast.walk(node) if isinstance(call, ast.Call)]

    def is_conf_get(call: ast.Call) -> bool:
        func = call.func
        return (
            isinstance(func, ast.Attribute)
            and func.attr in {"get", "getint", "getfloat", "getboolean", "getjson", "getlist", "has_option"}
            and isinstance(func.value, ast.Name)
            and func.value.id == "conf"
            and len(call.args) >= 2
            and _is_cosell_section(call.args[0], aliases)
        )

    keys: set[str] = set()
    wrappers: dict[str, tuple[int, str]] = {}  # helper name -> (index of its key parameter, key prefix)
    # Direct reads, and the helpers that read the key one of their parameters names.
    for call in calls(tree):
        if is_conf_get(call) and isinstance(call.args[1], ast.Constant):
            keys.add(str(call.args[1].value))
    changed = True
    while changed:
        changed = False
        for fn in functions:
            if fn.name in wrappers:
                continue
            names = params(fn)
            for call in calls(fn):
                if is_conf_get(call):
                    key_node = call.args[1]
                    prefix_base = ""
                elif isinstance(call.func, ast.Name) and call.func.id in wrappers:
                    index, prefix_base = wrappers[call.func.id]
                    if len(call.args) <= index:
                        continue
                    key_node = call.args[index]
                else:
                    continue
                pattern = _key_pattern(key_node, names)
                if isinstance(pattern, tuple):
                    prefix, param = pattern
                    wrappers[fn.name] = (names.index(param), prefix_base + prefix)
                    changed = True
                    break
    # Every call of a helper with a literal key.
    for call in calls(tree):
        if isinstance(call.func, ast.Name) and call.func.id in wrappers:
            index, prefix = wrappers[call.func.id]
            if len(call.args) > index and isinstance(call.args[index], ast.Constant):
                keys.add(prefix + str(call.args[index].value))
    return keys


@cache
def cosell_keys() -> frozenset[str]:
    """Every ``[cosell]`` key the provider's code reads."""
    keys: set[str] = set()
    for path in sorted(PLUGIN_SOURCES.rglob("*.py")):
        keys |= cosell_keys_in(path.read_text())
    return frozenset(keys)


# --------------------------------------------------------------------------- checks


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE list form
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): v for k, v in env.items()}


def airflow_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the Airflow image: ours by name, plus any that share its build."""
    services = doc.get("services") or {}
    return {
        name: body
        for name, body in services.items()
        if name.startswith("airflow-") or name == "flower" or (body or {}).get("build") is not None
    }


def structure_problems(doc: dict[str, Any], text: str) -> list[str]:
    """What ``docker compose config`` would reject, or what would not start."""
    problems = []
    services = doc.get("services")
    if not isinstance(services, dict) or not services:
        return ["no services"]
    volumes = set((doc.get("volumes") or {}).keys())
    for name, body in services.items():
        if not isinstance(body, dict):
            problems.append(f"{name}: not a mapping")
            continue
        if not body.get("image") and not body.get("build"):
            problems.append(f"{name}: neither image nor build")
        build = body.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            if not (REPO / context / dockerfile).is_file():
                problems.append(f"{name}: build {context}/{dockerfile} does not exist")
        depends = body.get("depends_on") or {}
        for dep, spec in depends.items() if isinstance(depends, dict) else ((d, {}) for d in depends):
            if dep not in services:
                problems.append(f"{name}: depends_on {dep}, which is not a service")
            elif dep == name:
                problems.append(f"{name}: depends on itself")
            condition = (spec or {}).get("condition", "service_started")
            if condition not in DEPENDS_CONDITIONS:
                problems.append(f"{name}: depends_on {dep} with unknown condition {condition!r}")
            elif condition == "service_healthy" and "healthcheck" not in services.get(dep, {}):
                problems.append(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
            profiles = set(services.get(dep, {}).get("profiles") or ())
            if profiles and not profiles <= set(body.get("profiles") or ()):
                problems.append(f"{name}: depends on {dep}, which only starts with a profile")
        health = body.get("healthcheck")
        if health is not None:
            test = health.get("test")
            if isinstance(test, list):
                if not test or test[0] not in {"CMD", "CMD-SHELL", "NONE"} or (test[0] != "NONE" and len(test) < 2):
                    problems.append(f"{name}: healthcheck test {test!r} is not [CMD|CMD-SHELL, ...]")
            elif not isinstance(test, str) or not test.strip():
                problems.append(f"{name}: healthcheck test must be a list or a command string")
            for field in ("interval", "timeout", "start_period", "start_interval"):
                if field in health and not DURATION_RE.match(str(health[field])):
                    problems.append(f"{name}: healthcheck {field} {health[field]!r} is not a duration")
            if "retries" in health and not (isinstance(health["retries"], int) and health["retries"] > 0):
                problems.append(f"{name}: healthcheck retries {health['retries']!r} is not a positive integer")
            unknown = set(health) - {"test", "interval", "timeout", "retries", "start_period", "start_interval"}
            if unknown - {"disable"}:
                problems.append(f"{name}: unknown healthcheck fields {sorted(unknown)}")
        for key, value in environment(body).items():
            if value is not None and not isinstance(value, str | int | float):
                problems.append(f"{name}: environment {key} is a {type(value).__name__}, not a string")
            if isinstance(value, bool):
                problems.append(f"{name}: environment {key} is YAML boolean {value}; quote it")
        for volume in body.get("volumes") or ():
            source = str(volume).split(":", 1)[0]
            if source.startswith("./") and not (REPO / source).exists():
                problems.append(f"{name}: bind-mount source {source} does not exist")
            elif not source.startswith(("/", ".", "$", "~")) and source not in volumes:
                problems.append(f"{name}: named volume {source} is not declared under volumes:")
        profiles = body.get("profiles")
        if profiles is not None and not (isinstance(profiles, list) and all(isinstance(p, str) for p in profiles)):
            problems.append(f"{name}: profiles must be a list of names")
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        for index in (m.start() for m in re.finditer(r"\$", line)):
            if index > 0 and line[index - 1] == "$":
                continue  # the second half of "$$"
            if not INTERPOLATION_RE.match(line, index):
                problems.append(f"line {line_no}: bad interpolation {line[index : index + 20]!r}")
    return problems


def deployment_problems(doc: dict[str, Any]) -> list[str]:
    """The CeleryExecutor topology of SPEC §8."""
    services = doc.get("services") or {}
    problems = [
        f"service {name} is missing" for name in (*AIRFLOW_SERVICES, "postgres", "redis") if name not in services
    ]
    if problems:
        return problems
    if services["postgres"].get("image") != "postgres:16":
        problems.append(f"postgres runs {services['postgres'].get('image')!r}, not postgres:16")
    if not str(services["redis"].get("image", "")).startswith("redis:"):
        problems.append(f"redis runs {services['redis'].get('image')!r}, not the official redis image")
    if "flower" in services and not services["flower"].get("profiles"):
        problems.append("flower starts by default; it is optional (a profile)")

    runs_airflow = airflow_services(doc)
    images = {(str(body.get("build")), body.get("image")) for body in runs_airflow.values()}
    for name, body in runs_airflow.items():
        if body.get("build") not in (".", {"context": "."}):
            problems.append(f"{name}: not built from the Dockerfile (build: {body.get('build')!r})")
    if len(images) != 1:
        problems.append(f"the Airflow services do not share one image: {sorted(map(str, images))}")

    metadata_urls = set()
    for name, body in runs_airflow.items():
        env = environment(body)
        if env.get("AIRFLOW__CORE__EXECUTOR") != "CeleryExecutor":
            problems.append(f"{name}: executor is {env.get('AIRFLOW__CORE__EXECUTOR')!r}, not CeleryExecutor")
        broker = urlsplit(str(env.get("AIRFLOW__CELERY__BROKER_URL", "")))
        if broker.scheme != "redis" or broker.hostname not in services:
            problems.append(f"{name}: Celery broker is not the redis service ({broker.geturl()!r})")
        backend = str(env.get("AIRFLOW__CELERY__RESULT_BACKEND", ""))
        backend_url = urlsplit(backend.removeprefix("db+"))
        if not backend.startswith("db+postgresql") or backend_url.hostname != "postgres":
            problems.append(f"{name}: Celery result backend is not the postgres service ({backend!r})")
        metadata = make_url(str(env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "sqlite://")))
        metadata_urls.add(metadata.render_as_string(hide_password=False))
        if metadata.get_backend_name() != "postgresql":
            problems.append(f"{name}: Airflow's metadata DB is {metadata.get_backend_name()}, not PostgreSQL")
        state_raw = env.get("AIRFLOW_CONN_COSELL_STATE")
        if not state_raw:
            problems.append(f"{name}: no AIRFLOW_CONN_COSELL_STATE: the state DB would be SQLite on one machine")
            continue
        state = make_url(str(state_raw))
        if state.get_backend_name() != "postgresql":
            problems.append(f"{name}: the cosell state DB is {state.get_backend_name()}, not PostgreSQL")
        if (state.host, state.port, state.database) == (metadata.host, metadata.port, metadata.database):
            problems.append(f"{name}: the cosell state DB is Airflow's metadata DB ({state.database})")
        if state.host not in services:
            problems.append(f"{name}: the cosell state DB host {state.host!r} is not a service")
        else:
            created = _databases_created(services[state.host])
            if state.database not in created | {environment(services[state.host]).get("POSTGRES_DB")}:
                problems.append(f"{name}: nothing creates the state database {state.database!r} on {state.host}")
    if len(metadata_urls) > 1:
        problems.append(f"the Airflow services do not share one metadata DB: {sorted(metadata_urls)}")

    for name, body in services.items():
        if name == WORKER or (name.startswith(f"{WORKER}-") and "celery worker" in str(body.get("command", ""))):
            if "container_name" in body:
                problems.append(f"{name}: container_name stops --scale {name}=N")
            if body.get("ports"):
                problems.append(f"{name}: a published port stops --scale {name}=N")
            if "celery worker" not in str(body.get("command", "")):
                problems.append(f"{name}: command {body.get('command')!r} is not `celery worker`")
    return problems


def _databases_created(postgres: dict[str, Any]) -> set[str]:
    """Databases the postgres service's init scripts create (bind-mounted into docker-entrypoint-initdb.d)."""
    created = set()
    for volume in postgres.get("volumes") or ():
        parts = str(volume).split(":")
        if len(parts) >= 2 and parts[1].startswith("/docker-entrypoint-initdb.d") and parts[0].startswith("./"):
            script = REPO / parts[0]
            if script.is_file():
                created |= set(re.findall(r"CREATE\s+DATABASE\s+\"?(\w+)\"?", script.read_text(), re.IGNORECASE))
    return created


def setting_problems(text: str, doc: dict[str, Any]) -> list[str]:
    """Every AIRFLOW__SECTION__KEY named in the file (environment keys and comments alike) is a
    setting Airflow or our provider reads."""
    names = set(SETTING_RE.findall(text))
    for body in (doc.get("services") or {}).values():
        names |= {m.groups() for key in environment(body or {}) if (m := SETTING_RE.fullmatch(key))}
    known = airflow_settings()
    ours = cosell_keys()
    problems = []
    for section_raw, key_raw in sorted(names):
        section, key = section_raw.lower(), key_raw.lower()
        if section == COSELL_SECTION:
            if key not in ours:
                problems.append(f"AIRFLOW__{section_raw}__{key_raw}: cosell-sync reads no [cosell] {key}")
            continue
        if section not in known:
            problems.append(f"AIRFLOW__{section_raw}__{key_raw}: Airflow has no [{section}] section")
        elif key not in known[section] and key.removesuffix("_cmd").removesuffix("_secret") not in known[section]:
            problems.append(f"AIRFLOW__{section_raw}__{key_raw}: Airflow has no setting [{section}] {key}")
    return problems


# --------------------------------------------------------------------------- the real file


def test_compose_is_structurally_valid() -> None:
    assert structure_problems(compose(), compose_text()) == []


def test_compose_is_the_celery_topology() -> None:
    assert deployment_problems(compose()) == []


def test_every_airflow_setting_in_compose_is_real() -> None:
    doc = compose()
    named = set(SETTING_RE.findall(compose_text()))
    assert ("CORE", "EXECUTOR") in named and ("CELERY", "BROKER_URL") in named  # the scan sees the file
    assert any(section == "COSELL" for section, _ in named)  # ...and our own section
    assert setting_problems(compose_text(), doc) == []


def test_anchors_and_merge_keys_resolve() -> None:
    """Every Airflow service gets the common environment through ``<<: *airflow-common``, also
    those that extend it (the worker's DUMB_INIT_SETSID, airflow-init's _AIRFLOW_DB_MIGRATE)."""
    doc = compose()
    common = environment(doc["x-airflow-common"])
    assert common["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    for name, body in airflow_services(doc).items():
        assert environment(body).items() >= common.items(), name
    assert environment(doc["services"][WORKER])["DUMB_INIT_SETSID"] == "0"
    assert environment(doc["services"]["airflow-init"])["_AIRFLOW_DB_MIGRATE"] == "true"


def test_dockerfile_builds_the_pinned_airflow_with_this_provider() -> None:
    """The image's Airflow is the one pyproject pins, and the provider is installed into it."""
    pinned = next(
        dep.split("==", 1)[1]
        for dep in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
        if dep.replace(" ", "").startswith("apache-airflow==")
    )
    dockerfile = (REPO / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+apache/airflow:(\S+)", dockerfile, re.MULTILINE)
    assert base, "the Dockerfile does not start from the official apache/airflow image"
    assert base.group(1).split("-")[0] == pinned, f"image {base.group(1)} vs pyproject's apache-airflow=={pinned}"
    assert re.search(r"pip install .*\"apache-airflow==\$\{AIRFLOW_VERSION\}\".* /opt/cosell-sync", dockerfile)


def test_cosell_keys_come_from_the_code() -> None:
    """The list of [cosell] keys is read from the provider's code, through its helpers."""
    keys = cosell_keys()
    # one read directly, one through _setting, one through _seconds -> _setting, two webhook_* ones
    assert {"event_crms", "task_retries", "lease_ttl", "webhook_resource_hosts", "webhook_max_body_bytes"} <= keys
    assert not any("{" in key for key in keys)


# --------------------------------------------------------------------------- the checks can fail


def _set_env(service: dict[str, Any], key: str, value: str) -> None:
    """Set one variable in one service only (services share the anchored environment mapping)."""
    service["environment"] = {**environment(service), key: value}


def _mutated(change) -> tuple[dict[str, Any], str]:
    doc = compose()
    change(doc)
    return doc, yaml.safe_dump(doc)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("AIRFLOW__CELERY__BROKER_URLS: redis://redis", "no setting [celery] broker_urls"),
        ("AIRFLOW__CORE__EXECUTER: CeleryExecutor", "no setting [core] executer"),
        ("AIRFLOW__CELERYY__BROKER_URL: redis://redis", "no [celeryy] section"),
        ("AIRFLOW__COSELL__EVENT_CRM: salesforce", "reads no [cosell] event_crm"),
        ("# AIRFLOW__OPERATORS__DEFAULT_QUEUES: cosell", "no setting [operators] default_queues"),
    ],
)
def test_a_typo_in_a_setting_fails(line: str, expected: str) -> None:
    text = compose_text().replace(
        "    AIRFLOW__CORE__LOAD_EXAMPLES: 'false'\n", f"    AIRFLOW__CORE__LOAD_EXAMPLES: 'false'\n    {line}\n"
    )
    assert text != compose_text()
    problems = setting_problems(text, load(text))
    assert len(problems) == 1 and expected in problems[0], problems


def test_secret_suffixes_of_real_settings_pass() -> None:
    text = "x:\n  AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD: cat /run/secrets/db\n"
    assert setting_problems(text, {}) == []


def test_a_cosell_key_read_through_a_helper_is_found() -> None:
    source = (
        "from airflow.sdk import conf\n"
        "SECTION = 'cosell'\n"
        "def _get(name, default):\n"
        "    return conf.get(SECTION, f'queue_{name}', fallback=default)\n"
        "def _number(key):\n"
        "    return float(_get(key, '1'))\n"
        "A = _number('limit')\n"
        "B = conf.get('cosell', 'direct')\n"
        "C = conf.get('other', 'not_ours')\n"
    )
    assert cosell_keys_in(source) == {"queue_limit", "direct"}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["services"][WORKER].__setitem__("container_name", "worker"), "container_name stops --scale"),
        (lambda d: d["services"][WORKER].__setitem__("ports", ["8793:8793"]), "published port stops --scale"),
        (lambda d: d["services"].pop("airflow-triggerer"), "service airflow-triggerer is missing"),
        (
            lambda d: _set_env(d["services"]["airflow-scheduler"], "AIRFLOW__CORE__EXECUTOR", "LocalExecutor"),
            "airflow-scheduler: executor is 'LocalExecutor'",
        ),
        (
            lambda d: d["services"]["airflow-worker"]["environment"].__setitem__(
                "AIRFLOW__CELERY__BROKER_URL", "amqp://guest@rabbitmq//"
            ),
            "Celery broker is not the redis service",
        ),
        (
            lambda d: d["services"]["airflow-worker"]["environment"].__setitem__(
                "AIRFLOW__CELERY__RESULT_BACKEND", "redis://redis:6379/1"
            ),
            "result backend is not the postgres service",
        ),
        (
            lambda d: d["services"]["airflow-worker"]["environment"].__setitem__(
                "AIRFLOW_CONN_COSELL_STATE", "postgresql+psycopg2://airflow:airflow@postgres/airflow"
            ),
            "the cosell state DB is Airflow's metadata DB",
        ),
        (
            lambda d: d["services"]["airflow-worker"]["environment"].__setitem__(
                "AIRFLOW_CONN_COSELL_STATE", "postgresql+psycopg2://airflow:airflow@postgres/cosell_stat"
            ),
            "nothing creates the state database 'cosell_stat'",
        ),
        (
            lambda d: d["services"]["airflow-worker"]["environment"].pop("AIRFLOW_CONN_COSELL_STATE"),
            "no AIRFLOW_CONN_COSELL_STATE",
        ),
        (
            lambda d: d["services"]["airflow-worker"].update(build=None, image="apache/airflow:3.3.2"),
            "airflow-worker: not built from the Dockerfile",
        ),
    ],
)
def test_a_broken_topology_fails(change, expected: str) -> None:
    doc, _ = _mutated(change)
    problems = deployment_problems(doc)
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda d: d["services"]["airflow-scheduler"]["depends_on"].__setitem__("airflow-int", {}),
            "depends_on airflow-int, which is not a service",
        ),
        (
            lambda d: d["services"]["airflow-scheduler"]["depends_on"]["airflow-init"].__setitem__(
                "condition", "service_done"
            ),
            "unknown condition 'service_done'",
        ),
        (
            lambda d: d["services"]["airflow-scheduler"]["depends_on"].__setitem__(
                "flower", {"condition": "service_started"}
            ),
            "depends on flower, which only starts with a profile",
        ),
        (lambda d: d["services"]["redis"]["healthcheck"].__setitem__("test", ["redis-cli", "ping"]), "not [CMD"),
        (lambda d: d["services"]["redis"]["healthcheck"].__setitem__("interval", "10 seconds"), "not a duration"),
        (lambda d: d["services"]["redis"]["healthcheck"].__setitem__("retries", 0), "not a positive integer"),
        (lambda d: d["services"]["redis"].pop("image"), "redis: neither image nor build"),
        (
            lambda d: (
                d["services"]["airflow-init"]["depends_on"].__setitem__(
                    "airflow-triggerer", {"condition": "service_healthy"}
                )
                or d["services"]["airflow-triggerer"].pop("healthcheck")
            ),
            "airflow-triggerer has no healthcheck",
        ),
        (lambda d: d["services"]["postgres"]["volumes"].append("other-volume:/x"), "named volume other-volume"),
        (lambda d: d["services"]["airflow-worker"]["environment"].__setitem__("X", True), "YAML boolean"),
    ],
)
def test_a_broken_structure_fails(change, expected: str) -> None:
    doc, text = _mutated(change)
    problems = structure_problems(doc, text)
    assert any(expected in problem for problem in problems), problems


def test_bad_interpolation_fails() -> None:
    text = compose_text().replace("${AIRFLOW_UID:-50000}", "${AIRFLOW UID}", 1)
    assert any("bad interpolation" in problem for problem in structure_problems(load(text), text))


# --------------------------------------------------------------------------- what the compose file and README promise


def test_state_connection_resolves_to_the_cosell_state_database(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compose file's AIRFLOW_CONN_COSELL_STATE, read the way the workers read it (Airflow's
    connection parsing, then the state store's URL), is the cosell_state database on postgres."""
    from airflow.sdk import BaseHook

    from cosell_sync.state.db import sqlalchemy_url_from_connection

    for name, body in airflow_services(compose()).items():
        monkeypatch.setenv("AIRFLOW_CONN_COSELL_STATE", str(environment(body)["AIRFLOW_CONN_COSELL_STATE"]))
        url = make_url(sqlalchemy_url_from_connection(BaseHook.get_connection("cosell_state")))
        assert (url.get_backend_name(), url.host, url.database) == ("postgresql", "postgres", "cosell_state"), name


@cache
def scale_out_section() -> str:
    readme = (REPO / "README.md").read_text()
    found = re.search(r"^## Scale out\n(.*?)(?=^## )", readme, re.MULTILINE | re.DOTALL)
    assert found, "README.md has no '## Scale out' section"
    return found.group(1)


def test_readme_scale_out_names_real_settings_services_and_profiles() -> None:
    section = scale_out_section()
    assert setting_problems(section, {}) == []
    services = compose()["services"]
    scaled = set(re.findall(r"--scale ([\w-]+)=\d+", section))
    assert WORKER in scaled and scaled <= set(services), scaled
    profiles = {p for body in services.values() for p in body.get("profiles") or ()}
    named = set(re.findall(r"--profile ([\w-]+)", section))
    assert named and named <= profiles, (named, profiles)


def test_readme_helm_values_snippet() -> None:
    """The Helm values parse and carry the executor, our image and the state DB connection."""
    section = scale_out_section()
    helm = next(yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", section, re.DOTALL))
    assert helm["executor"] in {"KubernetesExecutor", "CeleryExecutor"}
    assert helm["images"]["airflow"]["repository"] and helm["data"]["metadataSecretName"]
    envs = {entry["envName"] for entry in helm["secret"]}
    assert {"AIRFLOW_CONN_COSELL_STATE", "AIRFLOW_CONN_PARTNER_CENTER_DEFAULT"} <= envs
