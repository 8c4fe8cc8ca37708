//! The timing rule the model benchmarks share with their PyTorch counterparts
//! (scripts/bench_unet.py `median_ms`).

use std::time::{Duration, Instant};

use candle_core::Result;

/// 2 warm-up calls, then calls until 30 are timed or about 3 s have passed (at least 5);
/// returns the median in ms and the number of timed calls.
pub fn median_ms(mut f: impl FnMut() -> Result<()>) -> Result<(f64, usize)> {
    for _ in 0..2 {
        f()?;
    }
    let budget = Duration::from_secs(3);
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < 30 && (times.len() < 5 || start.elapsed() < budget) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times.len()))
}
