//! Generates the protobuf messages and async ttrpc client/server for `protos/agent.proto`.
//! ttrpc-codegen parses the proto in pure Rust, so no `protoc` is needed.

use std::path::PathBuf;

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=protos/agent.proto");
    Codegen::new()
        .inputs(["protos/agent.proto"])
        .include("protos")
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .out_dir(&out)
        .run()
        .expect("generating the agent ttrpc code from protos/agent.proto");

    // `include!` cannot take files with inner attributes; drop them.
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out.join(name);
        let text = std::fs::read_to_string(&path).expect("reading generated code");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#!") && !l.starts_with("//!"))
            .collect();
        std::fs::write(&path, kept.join("\n")).expect("rewriting generated code");
    }
}
