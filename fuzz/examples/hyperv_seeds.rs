//! Writes the `hyperv_handlers` target's seeds (`vmbus_fuzz::hyperv::seed::all`) into
//! fuzz/seeds/hyperv_handlers/. Run: cargo run --manifest-path fuzz/Cargo.toml --example
//! hyperv_seeds

fn main() -> std::io::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/hyperv_handlers");
    std::fs::create_dir_all(&dir)?;
    for (name, bytes) in vmbus_fuzz::hyperv::seed::all() {
        vmbus_fuzz::hyperv_handlers(&bytes);
        std::fs::write(dir.join(name), &bytes)?;
        println!("{name}: {} bytes", bytes.len());
    }
    Ok(())
}
