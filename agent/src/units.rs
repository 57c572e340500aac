//! Float quantities (from Kubernetes quantities and percentages) to whole units, rounded up as upstream rounds
//! them, saturating at the type's ends (what Rust's `as` does for floats; NaN is 0).

/// `v` rounded up, 0 for negative values and NaN, `u64::MAX` past it.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // saturating by the language's definition
pub fn ceil_u64(v: f64) -> u64 {
    v.max(0.0).ceil() as u64
}

/// `v` rounded up, saturating at `i64`'s ends (NaN is 0).
#[allow(clippy::cast_possible_truncation)] // saturating by the language's definition
pub fn ceil_i64(v: f64) -> i64 {
    v.ceil() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_up_and_saturate() {
        assert_eq!(ceil_u64(1.2), 2);
        assert_eq!(ceil_u64(-3.0), 0);
        assert_eq!(ceil_u64(f64::NAN), 0);
        assert_eq!(ceil_u64(1e30), u64::MAX);
        assert_eq!(ceil_i64(-1.5), -1);
        assert_eq!(ceil_i64(1e30), i64::MAX);
    }
}
