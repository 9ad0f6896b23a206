"""Fault campaign: many browser sessions refreshing under random faults, invariants checked from the IdP's ledger.

Starts redis-server (unless REDIS_URL is set) behind the fault proxy (tests/support/faultproxy.py),
the test IdP with short-lived access tokens, the echo upstream and `gateway serve --workers 2`.
Simulated browsers, each one session, keep their cookies as a browser does and loop over: a
request, a burst of parallel XHRs, a reload from a second tab still holding the cookies from
before the last rotation (within the grace period), and now and then a logout. Meanwhile one
fault at a time is injected from the list of issue 12: a Redis reply delayed (up to twice the
lease), dropped or reset for one of the refresh scripts, Redis down or black-holed for seconds,
the pub/sub subscription black-holed, the IdP slower than the lease, IdP 503s, the IdP redeeming
and then losing its answer (hang, reset, 504, garbage), a worker SIGKILLed, a worker paused.

Checked at the end, from the IdP's per-token ledger and what the browsers saw:
- I1: no refresh token was presented to the IdP twice (no ``reused`` event at all);
- I2: every session that ended without a logout ended with ``refresh_lost`` for a token the IdP
  had redeemed and whose successor never reached the browser; no other 401;
- I3: after each logout, the session's cookies (old and newest) and its newest access token as a
  Bearer are refused;
- IdP calls per rotation, statuses, and sessions ended per fault kind.

    .venv/bin/python bench/fault_campaign.py [--duration 600] [--sessions 40] [--out bench/results/faults.md]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import os
import platform
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from refresh_storm import redis_url  # noqa: E402
from support.faultproxy import FaultProxy  # noqa: E402
from support.servers import GatewayProcess, IdPProcess, set_cookies, start_gateway, start_idp, start_upstream  # noqa: E402

from gateway.sealing import Sealer  # noqa: E402
from gateway.store import lua  # noqa: E402

SECRET = "campaign-hs256-secret-0123456789abcdef"
STORE_SECRET = "campaign-store-secret"
ACCESS, REFRESH = "gw_access", "gw_refresh"
# grace_period well under the default 30 s, but longer than a worker is ever paused here (3 s): a
# worker paused after rotating and before answering, longer than grace_period, then killed, leaves
# the browser with a superseded token that can only look like a replay (docs/refresh.md).
LEASE, GRACE, TIMEOUT = 1.0, 10.0, 4.0
SCRIPTS = {
    "read_record": lua.READ_RECORD,
    "begin_attempt": lua.BEGIN_ATTEMPT,
    "settle_attempt": lua.SETTLE_ATTEMPT,
    "finish": lua.FINISH,
    "end_family": lua.END_FAMILY,
    "acquire": lua.ACQUIRE,
    "renew": lua.RENEW,
    "release": lua.RELEASE,
}


def sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


def token_of(value: str) -> str:
    """The refresh token a refresh cookie holds (sealed by the gateway), or ``value`` itself (a raw token)."""
    return Sealer(STORE_SECRET).open_cookie(value, REFRESH) or value


def jti(value: str) -> str:
    return str(jwt.decode(token_of(value), options={"verify_signature": False})["jti"])


@dataclass
class Tally:
    """What the browsers saw, and what the fault injector did."""

    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    ends: collections.Counter[str] = field(default_factory=collections.Counter)
    ends_by_fault: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    lost: list[tuple[str, str, bool]] = field(default_factory=list)  # (jti held, fault, a worker died just before)
    lost_tokens: list[str] = field(default_factory=list)  # what sessions held when they ended: found in the log
    violations: list[str] = field(default_factory=list)
    logouts_checked: int = 0
    deferred: list[dict[str, str]] = field(default_factory=list)  # logged out during a fault: checked at the end
    rotations_seen: int = 0
    unseen_after_a_death: int = 0  # refresh_lost, the IdP never saw the token, a worker had just died or paused
    last_death: float = -1e9  # when a worker was last killed or paused (monotonic)
    history: list[list[Any]] = field(default_factory=list)  # [began, ended or None, kind]
    current_fault: str = "none"
    last_fault: str = "none"
    last_fault_at: float = 0.0

    def fault_now(self, within: float = 12.0) -> str:
        """Every fault in progress or ended in the last ``within`` s (effects outlive a fault: a killed
        worker's attempt is taken over only after its deadline, ~11 s here), joined with " + "."""
        now = time.monotonic()
        recent = [kind for began, ended, kind in self.history if ended is None or now - ended < within]
        return " + ".join(dict.fromkeys(recent)) or "none"


class Browser:
    """One user: cookies kept as a browser keeps them, a second tab that lags one rotation behind."""

    def __init__(self, gw: str, idp: IdPProcess, tally: Tally, rng: random.Random) -> None:
        self.gw, self.idp, self.tally, self.rng = gw, idp, tally, rng
        self.jar: dict[str, str] = {}
        self.previous: dict[str, str] = {}  # before the last rotation, and when it happened
        self.rotated_at = 0.0
        self.received: set[str] = set()

    def login(self) -> None:
        session = self.idp.issue("alice", access_ttl=None)
        sealed = Sealer(STORE_SECRET).seal_cookie(session["refresh"], REFRESH)  # as the gateway would have set it
        self.jar, self.previous = {ACCESS: session["access"], REFRESH: sealed}, {}
        self.received = {jti(session["refresh"])}

    def cookie(self, jar: dict[str, str]) -> str:
        return "; ".join(f"{k}={v}" for k, v in jar.items())

    def take(self, response: httpx.Response) -> None:
        jar = set_cookies(response)
        if jar.get(REFRESH) is not None and jar[REFRESH].value and jar[REFRESH].value != self.jar.get(REFRESH):
            self.previous, self.rotated_at = dict(self.jar), time.monotonic()
            self.tally.rotations_seen += 1
            self.received.add(jti(jar[REFRESH].value))
        for name in (ACCESS, REFRESH):
            if name in jar:
                if jar[name].value:
                    self.jar[name] = jar[name].value
                else:
                    self.jar.pop(name, None)

    async def run(self, client: httpx.AsyncClient, until: float) -> None:
        self.login()
        while time.monotonic() < until:
            roll = self.rng.random()
            ended = False
            try:
                if roll < 0.45:
                    ended = await self.requests(client, 1, self.jar)
                elif roll < 0.8:
                    ended = await self.requests(client, self.rng.randint(3, 12), self.jar)
                elif roll < 0.97:
                    fresh = self.previous and time.monotonic() - self.rotated_at < 1.0
                    ended = await self.requests(client, 2, self.previous if fresh else self.jar)
                else:
                    ended = True  # even if the answer is lost (a killed worker): the user meant to leave
                    await self.logout(client)
            except httpx.HTTPError:
                pass  # a paused or killed worker: the browser just tries again
            if ended:
                self.login()
            await asyncio.sleep(self.rng.uniform(0.1, 0.6))

    async def requests(self, client: httpx.AsyncClient, count: int, jar: dict[str, str]) -> bool:
        """True when the session ended (and was accounted for)."""
        held = self.jar.get(REFRESH)
        cookie = self.cookie(jar)
        responses = await asyncio.gather(
            *(client.get(f"{self.gw}/p/{i}", headers={"Cookie": cookie}) for i in range(count)),
            return_exceptions=True,
        )
        ended = None
        for response in responses:
            if isinstance(response, BaseException):
                continue
            self.tally.statuses[response.status_code] += 1
            self.take(response)  # as a browser does, whatever the status
            if response.status_code == 401:
                ended = response.json().get("reason", "?")
        if ended is None:
            return False
        fault = self.tally.fault_now()
        self.tally.ends[ended] += 1
        self.tally.ends_by_fault[(ended, fault)] += 1
        if held is not None:
            self.tally.lost_tokens.append(held)
        if ended == "refresh_lost" and held is not None:
            died = time.monotonic() - self.tally.last_death < 15
            self.tally.lost.append((jti(held), fault, died))
        else:
            self.tally.violations.append(f"session ended with {ended} (fault: {fault})")
        return True

    async def logout(self, client: httpx.AsyncClient) -> None:
        old, newest = dict(self.previous), dict(self.jar)
        headers = {"Cookie": self.cookie(newest), "Origin": self.gw}
        response = await client.post(f"{self.gw}/.gateway/logout", headers=headers)
        if response.status_code != 204:
            self.tally.violations.append(f"logout answered {response.status_code}")
            return
        self.tally.ends["logout"] += 1
        await asyncio.sleep(1.2)  # the denylist reaches every worker within a second
        checks = [{"Cookie": f"{REFRESH}={newest.get(REFRESH, '')}"}]
        if old:
            checks.append({"Cookie": f"{REFRESH}={old.get(REFRESH, '')}"})
        if self.tally.fault_now(within=3.0) != "none":
            # With the store unreachable, other workers learn of the logout once it is back: the
            # refresh tokens are tried again at the end; live access tokens cannot be (they expire).
            self.tally.deferred += checks
            return
        if ACCESS in newest:
            checks += [{"Cookie": self.cookie(newest)}, {"Authorization": f"Bearer {newest[ACCESS]}"}]
        await check_ended(client, self.gw, checks, self.tally)


async def check_ended(client: httpx.AsyncClient, gw: str, checks: list[dict[str, str]], tally: Tally) -> None:
    """I3: every token of a logged-out session is refused."""
    for headers in checks:
        try:
            after = await client.get(f"{gw}/after-logout", headers=headers)
        except httpx.HTTPError:
            continue
        tally.logouts_checked += 1
        if after.status_code == 200:
            tally.violations.append(f"I3: a token of a logged-out session got 200 ({list(headers)[0]})")


class Injector:
    """One fault at a time, from issue 12's list, each for a few seconds."""

    def __init__(
        self, proxy: FaultProxy, idp: IdPProcess, gateway: GatewayProcess, tally: Tally, rng: random.Random, only: str
    ) -> None:
        self.proxy, self.idp, self.gateway, self.tally, self.rng = proxy, idp, gateway, tally, rng
        self.only = [name for name in only.split(",") if name]

    def workers(self) -> list[int]:
        assert self.gateway.process is not None
        pid = self.gateway.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        found = []
        for child in children:
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"resource_tracker" not in command:
                found.append(int(child))
        return found

    async def run(self, until: float) -> None:
        kinds = [
            self.redis_reply, self.redis_reply, self.redis_down, self.pubsub_down, self.idp_slow, self.idp_5xx,
            self.idp_answer_lost, self.worker_kill, self.worker_pause,
        ]  # fmt: skip
        if self.only:
            kinds = [k for k in kinds if k.__name__ in self.only]
        await asyncio.sleep(3)
        while kinds and time.monotonic() < until - 8:
            fault = self.rng.choice(kinds)
            await fault()
            if self.tally.history and self.tally.history[-1][1] is None:
                self.tally.history[-1][1] = time.monotonic()
            self.tally.last_fault, self.tally.last_fault_at = self.tally.current_fault, time.monotonic()
            self.tally.current_fault = "none"
            await asyncio.sleep(self.rng.uniform(1.0, 3.0))

    def _begin(self, kind: str) -> None:
        self.tally.faults[kind] += 1
        self.tally.current_fault = kind
        self.tally.history.append([time.monotonic(), None, kind])

    async def redis_reply(self) -> None:
        name = self.rng.choice(list(SCRIPTS))
        action = self.rng.choice(["delay_reply", "drop_reply", "reset_after", "reset_before"])
        self._begin(f"redis {action} ({name})")
        delay = self.rng.uniform(0.2, 2 * LEASE)
        self.proxy.add_rule(f"^EVALSHA {sha(SCRIPTS[name])}", action, delay=delay, times=1)
        await asyncio.sleep(3)
        self.proxy.clear_rules()

    async def redis_down(self) -> None:
        how = self.rng.choice(["down", "blackhole"])
        self._begin(f"redis {how} for seconds")
        await asyncio.to_thread(self.proxy.down if how == "down" else self.proxy.blackhole)
        await asyncio.sleep(self.rng.uniform(1.0, 3.0))
        await asyncio.to_thread(self.proxy.heal)

    async def pubsub_down(self) -> None:
        self._begin("pub/sub subscription black-holed")
        self.proxy.add_rule("SUBSCRIBE", "blackhole_conn", times=None)
        await asyncio.to_thread(self.proxy.reset_all)
        await asyncio.sleep(self.rng.uniform(3.0, 6.0))
        self.proxy.clear_rules()
        await asyncio.to_thread(self.proxy.heal)

    async def idp_slow(self) -> None:
        self._begin("IdP slower than the lease")
        await asyncio.to_thread(self.idp.behaviour, latency=self.rng.uniform(1.2, 2.0))  # within refresh.timeout
        await asyncio.sleep(4)
        await asyncio.to_thread(self.idp.behaviour, latency=0)

    async def idp_5xx(self) -> None:
        self._begin("IdP 5xx")
        await asyncio.to_thread(self.idp.behaviour, fail=self.rng.choice(["503", "500"]), fail_count=3)
        await asyncio.sleep(3)
        await asyncio.to_thread(self.idp.behaviour, fail=None)

    async def idp_answer_lost(self) -> None:
        mode = self.rng.choice(["redeem_then_hang", "redeem_then_reset", "redeem_then_504", "redeem_then_garbage"])
        self._begin(f"IdP redeems, answer lost ({mode.removeprefix('redeem_then_')})")
        await asyncio.to_thread(self.idp.behaviour, fail=mode, fail_count=1)
        await asyncio.sleep(3)
        await asyncio.to_thread(self.idp.behaviour, fail=None)

    async def worker_kill(self) -> None:
        workers = self.workers()
        if not workers:
            return
        self._begin("worker SIGKILLed")
        os.kill(self.rng.choice(workers), signal.SIGKILL)
        self.tally.last_death = time.monotonic()
        await asyncio.sleep(4)  # uvicorn starts a new one

    async def worker_pause(self) -> None:
        workers = self.workers()
        if not workers:
            return
        self._begin("worker paused (SIGSTOP)")
        pid = self.rng.choice(workers)
        os.kill(pid, signal.SIGSTOP)
        self.tally.last_death = time.monotonic()
        try:
            await asyncio.sleep(self.rng.uniform(1.0, 3.0))
        finally:
            os.kill(pid, signal.SIGCONT)


async def campaign(gw: GatewayProcess, idp: IdPProcess, proxy: FaultProxy, args: argparse.Namespace) -> Tally:
    tally = Tally()
    rng = random.Random(args.seed)
    until = time.monotonic() + args.duration
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)  # new connections reach every worker
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        browsers = [Browser(gw.url, idp, tally, random.Random(rng.random())) for _ in range(args.sessions)]
        injector = Injector(proxy, idp, gw, tally, random.Random(rng.random()), args.only)
        await asyncio.gather(injector.run(until), *(b.run(client, until) for b in browsers))
        await asyncio.to_thread(proxy.heal)
        await asyncio.sleep(3)
        await check_ended(client, gw.url, tally.deferred, tally)
    return tally


def verdict(tally: Tally, ledger: list[dict[str, Any]]) -> list[str]:
    """Check I1 and I2 from the IdP's ledger; returns the table rows of the report."""
    presented = collections.Counter(
        e["jti"] for e in ledger if e["event"] in ("redeemed", "reused", "reused_in_window")
    )
    redeemed = {e["jti"] for e in ledger if e["event"] == "redeemed"}
    events = collections.Counter(e["event"] for e in ledger)
    twice = [j for j, n in presented.items() if n > 1]
    if twice:
        tally.violations.append(f"I1: {len(twice)} refresh tokens presented to the IdP more than once")
    for held, fault, death in tally.lost:
        if held in redeemed:
            continue
        if death:
            # The owner recorded its attempt and died (or froze past the attempt's deadline) before
            # the IdP got the request: indistinguishable from dying after, so the session ends cleanly.
            tally.unseen_after_a_death += 1
        else:
            tally.violations.append(f"I2: refresh_lost for a token the IdP never redeemed (fault: {fault})")
    return [
        f"| IdP refresh requests (ledger) | {sum(events.values())} |",
        f"| redeemed | {events['redeemed']} |",
        f"| presented twice (I1) | {len(twice)} |",
        f"| reuse seen by the IdP | {events['reused']} |",
        f"| failed before redeeming (injected) | {events['failed']} |",
        f"| rejected | {events['rejected']} |",
    ]


def report(args: argparse.Namespace, tally: Tally, ledger_rows: list[str], wall: float, calls: int) -> str:
    lines = [
        f"# Fault campaign, {date.today()}",
        "",
        f"{platform.machine()} with {os.cpu_count()} cores; `gateway serve --workers {args.workers}`, Redis behind the "
        f"fault proxy, {args.sessions} browser sessions, access tokens of {args.access_ttl} s, "
        f"`lock_lease: {LEASE:g}`, `grace_period: {GRACE:g}`, `refresh.timeout: {TIMEOUT:g}`; "
        f"{wall:.0f} s, seed {args.seed}. Generated by `scripts/bench --faults` (bench/fault_campaign.py).",
        "",
        "## Faults injected (one at a time, each for a few seconds)",
        "",
        "| fault | times |",
        "|---|---|",
        *(f"| {kind} | {n} |" for kind, n in sorted(tally.faults.items())),
        "",
        "## What the browsers saw",
        "",
        "| | count |",
        "|---|---|",
        *(f"| HTTP {status} | {n} |" for status, n in sorted(tally.statuses.items())),
        f"| rotations received | {tally.rotations_seen} |",
        *(f"| sessions ended: {reason} | {n} |" for reason, n in sorted(tally.ends.items())),
        f"| logged-out tokens tried afterwards (I3), all refused | {tally.logouts_checked} |",
        f"| of the `refresh_lost` ends: the IdP never saw the token, its owner had just been killed or paused "
        f"| {tally.unseen_after_a_death} |",
        "",
        "Sessions that ended without a logout, by the faults in progress or ended less than 12 s before:",
        "",
        "| end | fault | sessions |",
        "|---|---|---|",
        *(f"| {end} | {fault} | {n} |" for (end, fault), n in sorted(tally.ends_by_fault.items())),
        "",
        "## The IdP's ledger",
        "",
        "| | count |",
        "|---|---|",
        *ledger_rows,
        f"| IdP refresh calls per rotation received | {calls / max(tally.rotations_seen, 1):.2f} |",
        "",
        "## Verdict",
        "",
    ]
    if tally.violations:
        counted = collections.Counter(tally.violations)
        lines += ["**Violations:**", "", *(f"- {v} (×{n})" for v, n in counted.items())]
    else:
        lines.append(
            "I1 held (no refresh token reached the IdP twice). I2 held: every session that ended without a "
            "logout ended cleanly with `refresh_lost`, for a token the IdP had redeemed and whose successor was "
            "lost with its answer, or (counted above) for a token whose owner was killed or paused between "
            "recording its attempt and the IdP receiving it, which the gateway cannot tell from the first. "
            "I3 held: every token of a logged-out session was refused."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--access-ttl", type=int, default=4)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--out", default="bench/results/faults.md")
    parser.add_argument("--trace", action="store_true", help="print the gateway's log lines of lost sessions")
    parser.add_argument(
        "--only", default="", help="inject only these fault kinds (Injector method names, comma-separated)"
    )
    args = parser.parse_args()
    url, redis_proc = redis_url()
    parts = urlsplit(url)
    try:
        with (
            FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy,
            start_idp(secret=SECRET, access_ttl=args.access_ttl) as idp,
            start_upstream() as upstream,
        ):
            config = {
                "store": {
                    "url": proxy.redis_url(int(parts.path.strip("/") or 0)),
                    "key_prefix": f"gwfaults:{os.getpid()}:",
                    "secret": STORE_SECRET,
                },
                "tokens": {"algorithms": ["HS256"], "secret": SECRET, "audience": "legacy-app", "leeway": 0},
                "refresh": {
                    "endpoint": f"{idp.url}/token",
                    "client_id": "legacy-app",
                    "client_secret": "demo-secret",
                    "revocation_endpoint": f"{idp.url}/revoke",
                    "timeout": TIMEOUT,
                    "lock_lease": LEASE,
                    "grace_period": GRACE,
                    "wait_timeout": 10,
                },
                "cookies": {"secure": False},
                "server": {"access_log": False},
                "routes": [{"name": "app", "path": "/", "upstream": upstream.url}],
            }
            with start_gateway(config, workers=args.workers) as gw:
                started = time.monotonic()
                tally = asyncio.run(campaign(gw, idp, proxy, args))
                wall = time.monotonic() - started
                time.sleep(2)
                ledger = idp.ledger()
                calls = idp.stats()["refresh_calls"]
                if args.trace:
                    Path("/tmp/fault_campaign-gateway.log").write_text(gw.log())
                    import json

                    ends = [
                        {"jti": jti(t), "hash": Sealer(STORE_SECRET).token_hash(token_of(t))[:12]}
                        for t in tally.lost_tokens
                    ]
                    Path("/tmp/fault_campaign-ends.json").write_text(
                        json.dumps({"ends": ends, "ledger": ledger, "families": idp.families()})
                    )
                    hashes = [Sealer(STORE_SECRET).token_hash(token_of(t))[:12] for t in tally.lost_tokens]
                    for line in gw.log().splitlines():
                        if any(h in line for h in hashes):
                            print(line, file=sys.stderr)
                tracebacks = gw.log().count("Traceback")
                if tracebacks:
                    tally.violations.append(f"the gateway logged {tracebacks} tracebacks")
                    print(gw.log()[gw.log().find("Traceback") - 2000 :][:6000], file=sys.stderr)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait()
    text = report(args, tally, verdict(tally, ledger), wall, calls)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    if tally.violations:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
