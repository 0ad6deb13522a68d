//! Human-readable sizes and counts for messages.

/// `216.1 KB`, `14.96 GB`: decimal units, three significant digits or so.
pub fn bytes(b: u64) -> String {
    scaled(b as f64, &["B", "KB", "MB", "GB", "TB"], 1000.0)
}

/// `54.0 K`, `7.24 B` (billions, as parameter counts are usually quoted).
pub fn count(n: u64) -> String {
    scaled(n as f64, &["", "K", "M", "B", "T"], 1000.0)
}

fn scaled(mut x: f64, units: &[&str], step: f64) -> String {
    let mut i = 0;
    while x >= step && i + 1 < units.len() {
        x /= step;
        i += 1;
    }
    let sep = if units[i].is_empty() { "" } else { " " };
    if i == 0 || x >= 100.0 {
        format!("{x:.0}{sep}{}", units[i])
    } else if x >= 10.0 {
        format!("{x:.1}{sep}{}", units[i])
    } else {
        format!("{x:.2}{sep}{}", units[i])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats() {
        assert_eq!(super::bytes(512), "512 B");
        assert_eq!(super::bytes(218_136), "218 KB");
        assert_eq!(super::bytes(1_530_000), "1.53 MB");
        assert_eq!(super::bytes(14_960_000_000), "15.0 GB");
        assert_eq!(super::count(54_000), "54.0 K");
        assert_eq!(super::count(7_240_000_000), "7.24 B");
        assert_eq!(super::count(12), "12");
    }
}
