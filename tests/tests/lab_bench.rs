//! `mesh-lab bench --quick` end to end: the whole bench (direct, mesh, waypoint, HAProxy,
//! idle connections) on its own lab, every figure present and plausible. The figures of
//! a quick run on debug binaries mean nothing; targets are reported, never asserted, and
//! nothing here depends on how fast the machine is (a debug path that falls behind the
//! fixed rate is a figure, not a failure).

use mesh_e2e::net::unique;
use mesh_e2e::{binary, require_tool};

#[test]
fn the_bench_measures_every_path_and_reports_every_target() {
    for tool in ["iperf3", "h2load", "haproxy", "curl"] {
        require_tool(tool);
    }
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("bench.json");
    let name = unique("b");
    let run = std::process::Command::new(binary("mesh-lab"))
        .args(["--name", &name, "--state-root"])
        .arg(root.path())
        .args(["bench", "--quick", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    // The bench takes its lab down itself, also when it fails.
    assert!(
        !std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(name.as_str()))
            .unwrap_or(false),
        "the bench left namespaces of lab {name} behind"
    );
    assert!(run.status.success(), "{stdout}\n{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let figures = v["runs"][0].as_object().unwrap();
    let get = |k: &str| {
        figures
            .get(k)
            .and_then(|f| f.as_f64())
            .unwrap_or_else(|| panic!("no figure {k} in {figures:?}"))
    };
    for path in ["direct", "mesh", "waypoint", "haproxy"] {
        for fig in [
            "rps_h1",
            "rps_h2",
            "conn_per_s",
            "lat_h1_p50_ms",
            "lat_h1_p90_ms",
            "lat_h1_p99_ms",
            "lat_h2_p99_ms",
            // How much of the fixed rate was reached: a figure, whatever the machine.
            "lat_h1_rate_share",
            "lat_h2_rate_share",
        ] {
            let x = get(&format!("{path}.{fig}"));
            assert!(x > 0.0 && x.is_finite(), "{path}.{fig} = {x}");
        }
        // Percentiles of one measured distribution, in order (an order, not a speed).
        let [p50, p90, p99] = ["p50", "p90", "p99"].map(|p| get(&format!("{path}.lat_h1_{p}_ms")));
        assert!(p50 <= p90 && p90 <= p99, "{path}: {p50} {p90} {p99}");
    }
    for path in ["direct", "mesh", "waypoint"] {
        assert!(get(&format!("{path}.tput1_gbps")) > 0.01);
        assert!(get(&format!("{path}.tput4_gbps")) > 0.01);
    }
    for k in [
        "mesh.proxy_cpu_s_per_1000_req",
        "mesh.proxy_cpu_s_per_gb",
        "waypoint.cpu_s_per_1000_req",
        "waypoint.proxy_cpu_s_per_1000_req",
        "waypoint.proxy_cpu_s_per_gb",
        "waypoint.cpu_s_per_gb",
        "haproxy.proxy_cpu_s_per_1000_req",
    ] {
        // At least one clock tick of work was seen.
        assert!(get(k) > 0.0, "{k}");
    }
    for who in ["ztunnel1", "ztunnel2", "waypoint", "haproxy"] {
        let idle = get(&format!("{who}.rss_idle_mib"));
        let peak = get(&format!("{who}.rss_peak_mib"));
        assert!(
            idle > 1.0 && peak >= idle * 0.9,
            "{who}: idle {idle}, peak {peak}"
        );
        assert!(get(&format!("{who}.rss_after_mib")) > 1.0);
        if who == "haproxy" {
            continue;
        }
        // The anonymous part (heap, stacks) is some of the RSS, never all of it: the
        // binary's pages are the rest.
        for when in ["idle", "after"] {
            let all = get(&format!("{who}.rss_{when}_mib"));
            let anon = get(&format!("{who}.rss_{when}_anon_mib"));
            assert!(
                anon > 0.0 && anon < all,
                "{who} {when}: anon {anon}, RSS {all}"
            );
        }
    }
    // Every held connection echoed a byte, so all 100 were open end to end while both
    // ztunnels' RSS was read: each is a process's RSS, and 100 tunnels cannot cost zero
    // pages (zero or less means the sample missed the hold, and would meet its target).
    for who in ["ztunnel1", "ztunnel2"] {
        let rss = get(&format!("scale.100.{who}_rss_mib"));
        assert!(rss > 1.0, "scale.100.{who}_rss_mib = {rss}");
    }
    let per_conn = get("scale.100.ztunnels_kib_per_conn");
    assert!(
        per_conn > 0.0 && per_conn.is_finite(),
        "scale.100.ztunnels_kib_per_conn = {per_conn}"
    );
    // Every target of the speed issue is measured and printed met or missed: a missed
    // target is a figure of this machine and build, never a failure of the test.
    let targets = v["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 10, "{targets:?}");
    assert!(
        targets.iter().all(|t| t["met"].is_boolean()),
        "every target measured: {targets:?}"
    );
    assert!(stdout.contains("targets (median"), "{stdout}");
    for t in targets {
        let name = t["name"].as_str().unwrap();
        let row = stdout
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("target {name:?} not printed:\n{stdout}"));
        assert!(
            row.contains("| met ") || row.contains("| missed "),
            "{row:?}"
        );
    }
    assert!(stdout.contains("haproxy"));
}
