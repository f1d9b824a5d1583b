//! What adding partitions and instances buys: live sync one way (the same
//! rows as `live-one`) with the topics at 1, 2 and 4 partitions and the
//! router and each side's applier as 1 or 2 instances (instance `i` of `N`
//! reads the partitions `p % N == i`; the capturers and the pause buffer
//! run once per deployment). Each layout is a fresh deployment; all of
//! them run one after the other in every run, so their ratios compare
//! figures of the same minutes.

use anyhow::{Context, Result};

use crate::env::{scaled_services, Ctx, Deployment};
use crate::scenarios::{finish, live_measure, run_map, warm_up, Params, RunResult};

/// (partitions, instances of the router and of each applier).
const LAYOUTS: [(i32, u32); 5] = [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2)];

/// The key of a layout's figure: `p4_i2`.
fn key(partitions: i32, instances: u32) -> String {
    format!("p{partitions}_i{instances}")
}

pub async fn scaling(ctx: &Ctx, p: &Params) -> Result<RunResult> {
    let mut out = RunResult::default();
    for (partitions, instances) in LAYOUTS {
        let key = key(partitions, instances);
        let r = layout(ctx, p, partitions, instances, &key)
            .await
            .with_context(|| format!("{partitions} partitions, {instances} instances"))?;
        let rate = r.values[&key];
        eprintln!("bench:   {partitions} partitions, {instances} instance(s): {rate:.0} rows/s");
        out.set(&key, rate);
    }
    Ok(out)
}

/// Rows/s of one layout, as the figure `key`.
async fn layout(
    ctx: &Ctx,
    p: &Params,
    partitions: i32,
    instances: u32,
    key: &str,
) -> Result<RunResult> {
    let mut d = Deployment::create_with(ctx, "scale", partitions).await?;
    let r = async {
        d.start_some(ctx, &scaled_services(instances)).await?;
        run_map(ctx, &d).await?;
        let left = d.left(ctx).await?;
        let right = d.right(ctx).await?;
        let alive = || d.check_alive();
        warm_up(&left, &right, false, &alive).await?;
        let (rate, _) = live_measure(&left, &right, p.live_rows, false, &alive).await?;
        let mut o = RunResult::default();
        o.set(key, rate);
        Ok(o)
    }
    .await;
    finish(ctx, d, r).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_shows_every_layout() {
        let spec = crate::report::spec("scaling", 1, 1, 1, 1);
        for (p, i) in LAYOUTS {
            assert!(spec.lines.iter().any(|l| l.key == key(p, i)), "{p}/{i}");
        }
    }
}
