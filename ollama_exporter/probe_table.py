"""`ollama-exporter probe`: probe models once and print what a user would feel, as a table.

The first thing to run when users say "it's slow": it uses the same probe code as the daemon (the
pre-flight /api/ps read, the version's num_ctx, caused-load detection and pin restore), so the numbers
match the metrics and it is as safe; only the wait for a pause in the model's use is skipped.
"""

from __future__ import annotations

from typing import Callable, Optional

from ollama_exporter.config import Config
from ollama_exporter.ollama import make_client
from ollama_exporter.poller import Poller
from ollama_exporter.prober import MIN_VERSION, ProbeResult, Prober, parse_version, targets

REFUSALS = {
    "unsupported": "it has neither the completion nor the embedding capability",
    "remote": "a cloud model: a probe would be a request to another server",
    "not_loaded": "not loaded, or about to expire (probing would load it; --probes.allow-cold-load allows that)",
    "reload_risk": "every num_ctx a probe can send made Ollama reload it",
}
COLUMNS = ("MODEL", "KIND", "TTFT", "TPOT", "E2E", "TOK/S", "LOAD", "PROMPT EVAL", "EVAL", "RESULT")


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def row(r: ProbeResult) -> tuple[str, ...]:
    if not r.ok:
        return (r.model, r.kind, "-", "-", "-", "-", "-", "-", "-", f"FAILED {r.reason}: {r.message}")
    rate = f"{r.eval_count / r.eval_duration:.1f}" if r.eval_duration > 0 else "-"
    prompt = f"{r.prompt_eval_count} tok / {_ms(r.prompt_eval_duration)}" if r.kind == "generate" else "-"
    evals = f"{r.eval_count} tok / {_ms(r.eval_duration)}" if r.kind == "generate" else "-"
    caused = "; CAUSED A RELOAD" + (", pin restored" if r.keep_alive_restored else "") if r.caused_load else ""
    return (r.model, r.kind, _ms(r.ttft), _ms(r.tpot), _ms(r.duration), rate, _ms(r.load_duration),
            prompt, evals, "ok" + caused)


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)] if rows else []
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def run_probe_command(config: Config, models: tuple[str, ...], count: int, echo: Callable[[str], None]) -> int:
    """Probe and print; returns the exit status (0 all ok, 1 a probe failed or Ollama is unreachable)."""
    client = make_client(config)  # marks its requests as the exporter's own, like the daemon's
    poller = Poller(client, config.poll_interval)
    poller.settle_shows = True
    snapshot = poller.poll_once()
    if not snapshot.up:
        failed = [s for s in snapshot.sources if not s.up]
        echo(f"cannot read Ollama at {config.ollama_url}: {failed[0].message if failed else 'no answer'}")
        return 1
    version = parse_version(snapshot.version)
    if version < MIN_VERSION:
        echo(f"Ollama {snapshot.version} resets keep_alive on every request without one, so probes are disabled "
             "before 0.2.0: a probe would unpin every keep_alive -1 model")
        return 1
    prober = Prober(client, config, lambda: snapshot)
    wanted = targets(snapshot, models or config.probes_models)
    if not wanted:
        echo("no model is loaded, so there is nothing to probe without loading one "
             "(name one with --model and set --probes.allow-cold-load to load it)")
        return 0
    rows, status = [], 0
    for t in wanted:
        refusal = t.refusal(config.probes_allow_cold_load)
        if refusal:
            echo(f"{t.model}: skipped, {REFUSALS[refusal]}")
            continue
        for _ in range(count):
            result = prober.probe_now(t, version)
            if result.skipped:
                echo(f"{t.model}: skipped, {REFUSALS.get(result.skipped, result.skipped)}")
                break
            status = status or (0 if result.ok else 1)
            rows.append(row(result))
    if rows:
        echo(table(rows))
    return status
