"""`meterline validate` exit codes and messages."""

import subprocess
import sys

import pytest

from tests.helpers import ROOT


def validate(path):
    return subprocess.run([sys.executable, "-m", "meterline", "validate", "-c", str(path)],
                          capture_output=True, text=True, timeout=30)


def test_the_embedded_default_is_valid():
    result = validate(ROOT / "pipeline.yaml")
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_the_packaged_default_is_the_repository_pipeline_yaml():
    packaged = ROOT / "meterline" / "default_pipeline.yaml"
    assert packaged.read_text() == (ROOT / "pipeline.yaml").read_text(), (
        "edit pipeline.yaml, then copy it over meterline/default_pipeline.yaml")


def test_without_c_and_without_a_local_file_the_packaged_default_is_used(tmp_path):
    result = subprocess.run([sys.executable, "-m", "meterline", "validate"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "default_pipeline.yaml: valid" in result.stdout


def test_without_c_a_local_pipeline_yaml_is_preferred(tmp_path):
    (tmp_path / "pipeline.yaml").write_text("receivers: {}\n")
    result = subprocess.run([sys.executable, "-m", "meterline", "validate"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "pipeline.yaml: invalid configuration" in result.stderr
    assert "default_pipeline" not in result.stderr


def test_a_bad_file_exits_1_with_line_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "pipeline.yaml").read_text().replace("listen: 127.0.0.1:9464",
                                                                "listen: nowhere"))
    result = validate(bad)
    assert result.returncode == 1
    assert "exporters.prometheus.listen" in result.stderr
    assert "bad.yaml:" in result.stderr


def test_a_missing_file_exits_1_and_says_so(tmp_path):
    result = validate(tmp_path / "nope.yaml")
    assert result.returncode == 1
    assert "cannot read the file" in result.stderr


def test_run_exits_1_naming_a_component_that_cannot_start(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "p.yaml"
        config.write_text(f"""
receivers: {{webhook: {{listen: "127.0.0.1:{port}"}}}}
exporters: {{debug: {{}}}}
service:
  data_dir: {tmp_path / "data"}
  admin: null
  pipelines: {{p: {{receivers: [webhook], exporters: [debug]}}}}
""")
        result = subprocess.run([sys.executable, "-m", "meterline", "run", "-c", str(config)],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "receiver webhook failed to start" in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize("admin", ["localhost:8888", "ftp://127.0.0.1:8888", "http://[::1",
                                   "http://127.0.0.1:port", "http://:8888"])
def test_tap_names_an_admin_address_that_is_no_http_url(admin):
    result = subprocess.run([sys.executable, "-m", "meterline", "tap", "--admin", admin],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr == (f"--admin must be the admin server's http:// or https:// URL, "
                             f"such as http://127.0.0.1:8888, got {admin!r}\n")


@pytest.mark.parametrize(("filter_", "said"), [
    ("{nope", "--filter is not JSON: Expecting property name enclosed in double quotes"),
    ("[" * 5000 + "]" * 5000, "--filter is JSON nested too deeply")])
def test_tap_names_a_filter_that_is_no_json_before_asking_the_daemon(filter_, said):
    result = subprocess.run([sys.executable, "-m", "meterline", "tap", "--admin",
                             "http://127.0.0.1:1", "--filter", filter_],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith(said), result.stderr


@pytest.mark.parametrize(("argv", "said"), [
    (["--nope"], "meterline: error: unrecognized arguments: --nope"),
    ([], "meterline: error: a command is needed: one of run, validate,"),
    (["validate", "--nope"], "meterline: error: unrecognized arguments: --nope"),
])
def test_a_bad_command_line_names_what_was_wrong(argv, said, capsys):
    from meterline.cli import main
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert said in capsys.readouterr().err
