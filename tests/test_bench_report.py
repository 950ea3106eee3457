"""bench/report.py: tables and target verdicts from a synthetic pytest-benchmark JSON (no benchmark run)."""
import importlib.util
import json
import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parents[1] / "bench"
_spec = importlib.util.spec_from_file_location("bench_report", _BENCH / "report.py")
report = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_report", report)
_spec.loader.exec_module(report)


def _bench(case, provider, median, peak=1.0, threads=2, exps=10 ** 9, compile_s=0.0):
    kind = provider.split("-", 1)[1]
    return {"name": f"test_fwd_bwd[{case}-{provider}]", "group": case,
            "stats": {"median": median, "iqr": 0.0, "rounds": 5},
            "extra_info": {"case": case, "provider": provider, "kind": kind, "threads": threads, "exps": exps,
                           "exp_per_s": exps / median, "peak_mb": peak, "peak_allocator_mb": peak,
                           "peak_rss_mb": peak, "compile_s": compile_s, "backend": kind}}


def _write(tmp_path, benchmarks, skipped=()):
    path = tmp_path / "out.json"
    path.write_text(json.dumps({"benchmarks": benchmarks, "skipped": list(skipped), "datetime": "now",
                                "machine_info": {"imbreg": {"lscpu_model": "Test CPU", "cpu_count": 2}}}))
    return str(path)


def test_targets_met_and_missed(tmp_path, capsys):
    benches = [
        # GAI: 50x eager, 6x compile -> met
        _bench("gai-K16-N614400", "cpu-reference", 0.500), _bench("gai-K16-N614400", "cpu-reference_compile", 0.060),
        _bench("gai-K16-N614400", "cpu-cpp", 0.010),
        # BMC N=4096: 50x eager but only 5x compile (needs 10x) -> missed
        _bench("bmc-N4096", "cpu-reference", 0.500), _bench("bmc-N4096", "cpu-reference_compile", 0.050),
        _bench("bmc-N4096", "cpu-cpp", 0.010),
        _bench("bmc-N65536", "cpu-cpp", 1.0, peak=3.5),
        {"name": "test_exp_throughput[n262144-exp_u20-2]", "stats": {"median": 0.1, "iqr": 0, "rounds": 5},
         "extra_info": {"impl": "exp_u20", "threads": 2, "n": 262144, "exp_per_s": 2e10}},
    ]
    skipped = [{"name": "test_fwd_bwd[bmc-N65536-cpu-reference]", "params": {"case": "bmc-N65536", "provider": "cpu-reference"},
                "reason": "the published formulation (eager) would need ~134.4 GB of extra memory at size 65536"}]
    rc = report.main([_write(tmp_path, benches, skipped)])
    out, err = capsys.readouterr()
    assert rc == 1                                                   # one target missed
    assert "GAI K=16, N=8·240·320: cpp 10 ms, eager 500 ms (50.0x, need 40x), compile 60 ms (6.0x, need 5x): MET" in err
    assert "BMC N=4096: cpp 10 ms, eager 500 ms (50.0x, need 40x), compile 50 ms (5.0x, need 10x): NOT MET" in err
    assert "BMC N=65536: extra memory: 3.5 MB (< 64 MB): MET" in err
    assert "BNI 100 bins, N=8·240·320: not evaluated" in err
    # the cpp row: 10 ms, 50x / 6x, 1e9 exps / 10 ms = 100 G exp/s = 500 % of the 20 G exp/s exp limit
    assert "| ours: cpp | cpp | 10 | 1.0 | 1.0 | 50× | 6× | 100.00 | 500 % | — |" in out
    assert "| published, eager | | skipped: needs ~134.4 GB |" in out
    assert out.startswith(report.BEGIN) and out.rstrip().endswith(report.END)


def test_update_replaces_only_its_section(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\n## GPU roofline\nkeep me\n\n{report.BEGIN}\nold\n{report.END}\n\n## FDS\nkeep me too\n")
    json_path = _write(tmp_path, [_bench("bmc-N4096", "cpu-cpp", 0.01)])
    assert report.main([json_path, "--update", str(md)]) == 0
    text = md.read_text()
    assert "old" not in text and "keep me\n" in text and "## FDS\nkeep me too\n" in text
    assert text.count(report.BEGIN) == 1 and "| ours: cpp | cpp | 10 |" in text
