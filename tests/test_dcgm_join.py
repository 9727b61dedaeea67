"""The README's dcgm-exporter join examples return the right series against dcgm-style data (promtool).

The queries are read from the README's "Joining with dcgm-exporter" block, so the documented text is the
tested text. The input has dcgm-exporter's label set (UUID, modelName, pci_bus_id, device, MIG's
GPU_I_PROFILE/GPU_I_ID, and both the old `Hostname` and the new `hostname` spelling) next to the series
ollama-exporter exports for the same GPUs.
"""

from __future__ import annotations

import re
import subprocess

import yaml

from tests.conftest import REPO

DCGM = 'job="dcgm", device="nvidia{0}", modelName="{1}", pci_bus_id="00000000:0{0}:00.0"'
A100, L40S = "NVIDIA A100-SXM4-80GB", "NVIDIA L40S"
SERIES = {
    # host gpu1, dcgm-exporter before 4.x (Hostname): GPU 0 whole, GPU 1 split into two MIG instances
    f'DCGM_FI_DEV_GPU_UTIL{{{DCGM.format(0, A100)}, instance="10.0.0.5:9400", gpu="0", UUID="GPU-aaaa", '
    f'Hostname="gpu1"}}': "87x5",
    f'DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{DCGM.format(1, A100)}, instance="10.0.0.5:9400", gpu="1", UUID="GPU-cccc", '
    f'GPU_I_PROFILE="3g.40gb", GPU_I_ID="1", Hostname="gpu1"}}': "0.5x5",
    f'DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{DCGM.format(1, A100)}, instance="10.0.0.5:9400", gpu="1", UUID="GPU-cccc", '
    f'GPU_I_PROFILE="3g.40gb", GPU_I_ID="2", Hostname="gpu1"}}': "0.25x5",
    # host gpu2, dcgm-exporter 4.x (hostname); its GPU also has index 0
    f'DCGM_FI_DEV_GPU_UTIL{{{DCGM.format(0, L40S)}, instance="10.0.0.6:9400", gpu="0", UUID="GPU-bbbb", '
    f'hostname="gpu2"}}': "12x5",
    # a GPU without Ollama on it
    f'DCGM_FI_DEV_GPU_UTIL{{{DCGM.format(0, L40S)}, instance="10.0.0.7:9400", gpu="0", UUID="GPU-dddd", '
    f'hostname="gpu3"}}': "99x5",
    # ollama-exporter on gpu1 and gpu2: two models share GPU-aaaa
    'ollama_loaded_model_gpu_memory_bytes{job="ollama", instance="gpu1:9778", model="qwen3:32b", gpu="0", '
    'uuid="GPU-aaaa"}': "20e9x5",
    'ollama_loaded_model_gpu_memory_bytes{job="ollama", instance="gpu1:9778", model="llama3.1:8b", gpu="0", '
    'uuid="GPU-aaaa"}': "6e9x5",
    'ollama_loaded_model_gpu_memory_bytes{job="ollama", instance="gpu2:9778", model="gemma3:27b", gpu="0", '
    'uuid="GPU-bbbb"}': "18e9x5",
    'ollama_gpu_mig_memory_total_bytes{job="ollama", instance="gpu1:9778", gpu="1", uuid="GPU-cccc", '
    'gpu_instance="1", mig_uuid="MIG-1111"}': "40e9x5",
    'ollama_gpu_mig_memory_total_bytes{job="ollama", instance="gpu1:9778", gpu="1", uuid="GPU-cccc", '
    'gpu_instance="2", mig_uuid="MIG-2222"}': "40e9x5",
}
EXPECTED = [
    [('{instance="gpu1:9778", model="qwen3:32b", uuid="GPU-aaaa", modelName="NVIDIA A100-SXM4-80GB"}', 0.87),
     ('{instance="gpu1:9778", model="llama3.1:8b", uuid="GPU-aaaa", modelName="NVIDIA A100-SXM4-80GB"}', 0.87),
     ('{instance="gpu2:9778", model="gemma3:27b", uuid="GPU-bbbb", modelName="NVIDIA L40S"}', 0.12)],
    [('{instance="gpu1:9778", uuid="GPU-cccc", gpu_instance="1", GPU_I_PROFILE="3g.40gb"}', 0.5),
     ('{instance="gpu1:9778", uuid="GPU-cccc", gpu_instance="2", GPU_I_PROFILE="3g.40gb"}', 0.25)],
]


def readme_queries() -> list[str]:
    section = (REPO / "README.md").read_text().split("### Joining with dcgm-exporter", 1)[1]
    block = re.search(r"```promql\n(.*?)```", section, re.S).group(1)
    queries = [q for q in block.split("\n\n") if q.strip()]
    return ["\n".join(line for line in q.splitlines() if not line.startswith("#")) for q in queries]


def test_the_readme_dcgm_joins_work_on_dcgm_style_series(promtool, tmp_path):
    queries = readme_queries()
    assert len(queries) == len(EXPECTED)
    tests = {"evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in SERIES.items()],
        "promql_expr_test": [{"expr": q, "eval_time": "5m",
                              "exp_samples": [{"labels": labels, "value": value} for labels, value in expected]}
                             for q, expected in zip(queries, EXPECTED)],
    }]}
    path = tmp_path / "dcgm.test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
