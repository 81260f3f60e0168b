fn main() -> anyhow::Result<()> {
    anyhow::bail!("failbackd is not built yet")
}
