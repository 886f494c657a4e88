"""Quiet by default: every command logs aisp_bench's own messages at INFO on stderr, other
libraries' at WARNING, and everything with ``hydra.verbose=true``.

The unit test applies each command's composed logging config with the function Hydra itself
calls when a job starts (``hydra.core.utils.configure_log``); the end-to-end test runs
``python -m aisp_bench.judge`` against a local OpenAI-compatible server, whose HTTP client
logs one INFO line per request.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import configure_log
from omegaconf import OmegaConf

from aisp_bench.config import CONF_DIR
from proc import run_tree
from test_judge import api_key, runs, server  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[1]
LOGGERS = ("", "aisp_bench", "hydra", "httpx", "urllib3", "filelock")


@pytest.fixture
def restore_logging():
    """Hydra's configure_log replaces the root logger's handlers and sets levels: undo it."""
    saved = {name: (logging.getLogger(name).level, list(logging.getLogger(name).handlers)) for name in LOGGERS}
    yield
    for name, (level, handlers) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers[:] = handlers


def job_logging(config_name: str, *overrides: str):
    """(job_logging, verbose) of a command's config as Hydra would apply them, the log file left out."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    conf = OmegaConf.to_container(cfg.hydra.job_logging, resolve=False)
    conf["handlers"].pop("file", None)  # Hydra's own log file in its scratch folder (runs): not stderr
    conf["root"]["handlers"] = [h for h in conf["root"]["handlers"] if h != "file"]
    return OmegaConf.create(conf), cfg.hydra.verbose


@pytest.mark.parametrize("config_name", ["config", "plan", "evaluate", "judge", "report"])
@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_info_reaches_stderr_only_when_verbose(config_name, verbose, capsys, restore_logging):
    log_config, verbose_config = job_logging(config_name, *(["hydra.verbose=true"] if verbose else []))
    assert verbose_config is verbose
    configure_log(log_config, verbose_config)
    logging.getLogger("aisp_bench.run").info("ours at info")
    logging.getLogger("hydra._internal.core_plugins.basic_launcher").info("launcher at info")
    logging.getLogger("httpx").info("HTTP Request: POST http://x")
    logging.getLogger("filelock").debug("lock acquired")
    logging.getLogger("urllib3").warning("theirs at warning")
    out, err = capsys.readouterr()
    assert out == ""  # stdout holds results only
    assert "ours at info" in err and "launcher at info" in err and "theirs at warning" in err
    assert ("HTTP Request" in err) is verbose and ("lock acquired" in err) is verbose


@pytest.mark.parametrize("verbose", [False, True])
def test_transformers_weight_bars_only_when_verbose(verbose, restore_logging):
    from transformers.utils import logging as hf_logging

    from aisp_bench.models.loading import weight_bars_follow_logging

    log_config, verbose_config = job_logging("config", *(["hydra.verbose=true"] if verbose else []))
    configure_log(log_config, verbose_config)
    was = hf_logging.is_progress_bar_enabled()
    try:
        (hf_logging.disable_progress_bar if verbose else hf_logging.enable_progress_bar)()  # the other state
        weight_bars_follow_logging()
        assert hf_logging.is_progress_bar_enabled() is verbose
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_judge_command_hides_http_requests_unless_verbose(server, api_key, runs, tmp_path):  # noqa: F811
    def judge(cache: str, *extra: str):
        args = [f"results_dir={tmp_path}", f"judge.cache_dir={tmp_path / cache}", f"judge.base_url={server.base_url}",
                "num_prompts=3", "trials=1", "judge.max_tokens=32", "method_b=bon_topp", *extra]
        return run_tree([sys.executable, "-m", "aisp_bench.judge", *args], cwd=ROOT, timeout=120)

    quiet = judge("cache_quiet")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    sent = server.count
    assert sent == 6  # 3 prompts x both orders, all sent
    assert "HTTP Request" not in quiet.stderr and f"judge: {sent}/{sent} replies" in quiet.stderr
    loud = judge("cache_loud", "hydra.verbose=true")  # a fresh cache: the same requests sent again
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert server.count == 2 * sent
    assert loud.stderr.count("HTTP Request: POST") >= sent
