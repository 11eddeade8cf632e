//! Compiles our .proto files with protox (pure Rust, no system protoc) and generates
//! prost messages plus tonic clients and servers.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "protos/istio/workload/workload.proto",
        "protos/istio/security/authorization.proto",
        "protos/istio/ca/ca.proto",
        "protos/istio/zds/zds.proto",
        "protos/envoy/discovery.proto",
        "protos/mesh/cni.proto",
        "protos/mesh/waypoint.proto",
        "protos/mesh/echo.proto",
    ];
    println!("cargo:rerun-if-changed=protos");
    let fds = protox::compile(files, ["protos"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
