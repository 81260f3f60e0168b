fn main() -> anyhow::Result<()> {
    anyhow::bail!("failback is not built yet")
}
