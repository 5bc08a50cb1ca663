//! Every WGSL file parses and validates with naga, the front end wgpu itself uses, so a shader error fails
//! here with its file and line before any GPU is touched.

use std::path::Path;

#[test]
fn every_shader_parses_and_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wgsl"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no shaders found in {}", dir.display());
    // Every shader is compiled with its parts and shaders/common.wgsl appended (see the `shader!` macro).
    let common = std::fs::read_to_string(dir.join("common.wgsl")).unwrap();
    let mut failures = Vec::new();
    for path in &files {
        if path.ends_with("matmul_f16_weights.wgsl") {
            continue; // a block of the f16-weight modules, validated inside them below
        }
        let text = std::fs::read_to_string(path).unwrap();
        let src = if path.ends_with("common.wgsl") {
            text
        } else {
            let name = path.file_name().unwrap().to_str().unwrap();
            match wgpu_mlkd::gpu::compose_shader_file(name, &text, &common) {
                Some(src) => src,
                None => continue, // a part (shaders/matmul_common.wgsl), validated inside its modules
            }
        };
        let shown = path
            .strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap_or(path)
            .display()
            .to_string();
        // The matmul modules also run with f16 weights (`f16_weight_module`); those variants unpack f16.
        let is_matmul = shown.ends_with("matmul.wgsl") || shown.ends_with("matmul_sg.wgsl");
        let variants: Vec<(String, String, bool)> = if is_matmul {
            vec![
                (shown.clone(), src.clone(), false),
                (
                    format!("{shown} (f16 weights)"),
                    wgpu_mlkd::ops::matmul::f16_weight_module(&src),
                    true,
                ),
            ]
        } else {
            vec![(shown, src, false)]
        };
        for (shown, src, f16) in variants {
            let module = match naga::front::wgsl::parse_str(&src) {
                Ok(m) => m,
                Err(e) => {
                    failures.push(e.emit_to_string_with_path(&src, &shown));
                    continue;
                }
            };
            // Subgroup kernels (`*_sg.wgsl`, and the quad attention) are only created on adapters that have
            // subgroups, and the f16-weight modules only where the adapter can unpack f16; the rest must need
            // neither.
            let mut caps = naga::valid::Capabilities::default();
            if shown.contains("_sg.wgsl") || shown.ends_with("attention_quad.wgsl") {
                caps |= naga::valid::Capabilities::SUBGROUP;
            }
            if f16 {
                caps |= naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32;
            }
            let mut validator = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps);
            if let Err(e) = validator.validate(&module) {
                failures.push(e.emit_to_string_with_path(&src, &shown));
                continue;
            }
            eprintln!("{shown}: ok ({} entry points)", module.entry_points.len());
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_validator_catches_a_broken_shader() {
    // The check above must be able to fail: a type error is reported with its line.
    let src = "@compute @workgroup_size(1)\nfn main() {\n  let x: f32 = 1u;\n}\n";
    let err = naga::front::wgsl::parse_str(src)
        .map(|m| {
            naga::valid::Validator::new(naga::valid::ValidationFlags::all(), Default::default())
                .validate(&m)
                .is_ok()
        })
        .map_err(|e| e.emit_to_string_with_path(src, "broken.wgsl"));
    let msg = err.expect_err("a type error must not parse");
    assert!(msg.contains("broken.wgsl:3"), "{msg}");
}
