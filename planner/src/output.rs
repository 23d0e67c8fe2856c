//! `plan.json` and `plan.svg`: the chart is written by hand (no plotting crate).

use std::fmt::Write as _;

use crate::PlanOutput;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A wall clock in the most readable unit.
pub fn human_duration(s: f64) -> String {
    if !s.is_finite() {
        return "∞".to_string();
    }
    if s < 120.0 {
        format!("{s:.1} s")
    } else if s < 7_200.0 {
        format!("{:.1} min", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.1} h", s / 3600.0)
    } else {
        format!("{:.1} d", s / 86_400.0)
    }
}

const WIDTH: f64 = 900.0;
const ROW: f64 = 44.0;
const TOP: f64 = 70.0;
const LABEL_W: f64 = 150.0;
const PANEL_W: f64 = 300.0;
const GAP: f64 = 40.0;

/// Two panels, one row per mode: wall clock to the token budget (log scale, with the speedup
/// over DP), and goodput next to compute utilisation (0–100 %).
pub fn render_svg(plan: &PlanOutput) -> String {
    let rows = plan.modes.len() as f64;
    let height = TOP + rows * ROW + 70.0;
    let mut svg = String::new();
    // Writing to a String cannot fail; the results are ignored on purpose.
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let title = format!(
        "{} — {} learners × {} chips, {} Gbit/s, {} ms RTT, {} tokens",
        plan.model,
        plan.input.learners,
        plan.input.gpus_per_learner,
        plan.input.link_rate_gbps,
        plan.input.link_rtt_ms,
        format_tokens(plan.input.token_budget),
    );
    let _ = writeln!(
        svg,
        r#"<text x="10" y="22" font-size="15" font-weight="bold">{}</text>"#,
        escape(&title)
    );
    let x1 = LABEL_W;
    let x2 = LABEL_W + PANEL_W + GAP;
    let _ = writeln!(
        svg,
        r#"<text x="{x1}" y="50">Wall clock to the token budget (log scale)</text><text x="{x2}" y="50">Goodput (dark) and compute utilisation (light), %</text>"#
    );

    // Log scale from a decade below the fastest mode to the slowest.
    let walls: Vec<f64> = plan
        .modes
        .iter()
        .map(|m| m.wall_clock_s)
        .filter(|w| w.is_finite() && *w > 0.0)
        .collect();
    let lo = walls
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .max(1e-9)
        .log10()
        .floor()
        - 1.0;
    let hi = walls
        .iter()
        .copied()
        .fold(0.0, f64::max)
        .max(1e-9)
        .log10()
        .ceil()
        .max(lo + 1.0);
    let scale = |w: f64| ((w.max(1e-9).log10() - lo) / (hi - lo)).clamp(0.0, 1.0) * PANEL_W;

    for (i, m) in plan.modes.iter().enumerate() {
        let y = TOP + i as f64 * ROW;
        let _ = writeln!(
            svg,
            r#"<text x="10" y="{}">{}</text>"#,
            y + 20.0,
            escape(&m.label)
        );
        let w = scale(m.wall_clock_s);
        let _ = writeln!(
            svg,
            r##"<rect x="{x1}" y="{y}" width="{w:.1}" height="28" fill="#4c78a8"/>"##
        );
        // The label goes after a short bar, inside a long one (so it never runs into the
        // right-hand panel).
        let (x, anchor, fill) = if w > 0.6 * PANEL_W {
            (x1 + w - 4.0, "end", "white")
        } else {
            (x1 + w + 4.0, "start", "black")
        };
        let _ = writeln!(
            svg,
            r#"<text x="{x:.1}" y="{}" text-anchor="{anchor}" fill="{fill}">{} ({:.1}× DP)</text>"#,
            y + 18.0,
            escape(&human_duration(m.wall_clock_s)),
            m.speedup_vs_dp
        );
        let g = m.goodput.clamp(0.0, 1.0) * PANEL_W;
        let u = m.compute_utilization.clamp(0.0, 1.0) * PANEL_W;
        let _ = writeln!(
            svg,
            r##"<rect x="{x2}" y="{y}" width="{u:.1}" height="13" fill="#9ecae9"/>"##
        );
        let _ = writeln!(
            svg,
            r##"<rect x="{x2}" y="{}" width="{g:.1}" height="13" fill="#1f5f99"/>"##,
            y + 15.0
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}">{:.0} % / {:.0} %</text>"#,
            x2 + PANEL_W + 6.0,
            y + 18.0,
            100.0 * m.goodput,
            100.0 * m.compute_utilization
        );
    }
    let axis_y = TOP + rows * ROW + 4.0;
    let _ = writeln!(
        svg,
        r##"<line x1="{x1}" y1="{axis_y}" x2="{}" y2="{axis_y}" stroke="#555"/>"##,
        x1 + PANEL_W
    );
    let decades = (hi - lo) as i32;
    for k in 0..=decades {
        let x = x1 + f64::from(k) / f64::from(decades.max(1)) * PANEL_W;
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{axis_y}" x2="{x:.1}" y2="{}" stroke="#555"/><text x="{x:.1}" y="{}" text-anchor="middle" font-size="10">{}</text>"##,
            axis_y + 4.0,
            axis_y + 16.0,
            escape(&human_duration(10f64.powf(lo + f64::from(k))))
        );
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{x2}" y1="{axis_y}" x2="{}" y2="{axis_y}" stroke="#555"/>"##,
        x2 + PANEL_W
    );
    for pct in [0, 50, 100] {
        let x = x2 + f64::from(pct) / 100.0 * PANEL_W;
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{axis_y}" x2="{x:.1}" y2="{}" stroke="#555"/><text x="{x:.1}" y="{}" text-anchor="middle" font-size="10">{pct} %</text>"##,
            axis_y + 4.0,
            axis_y + 16.0
        );
    }
    let footer = format!(
        "step {:.2} s of compute; codec {} up / {} down; P={} H={} τ={}; MTBI/chip {}; atoll-planner {}",
        plan.step_compute_s,
        plan.input.codec.name(),
        plan.input.down_codec.unwrap_or(plan.input.codec).name(),
        plan.input.fragments,
        plan.input.h,
        plan.input.tau,
        plan.input.mtbi_chip_years.map_or("no failures".to_string(), |y| format!("{y} y")),
        env!("CARGO_PKG_VERSION"),
    );
    let _ = writeln!(
        svg,
        r##"<text x="10" y="{}" font-size="10" fill="#555">{}</text>"##,
        height - 12.0,
        escape(&footer)
    );
    svg.push_str("</svg>\n");
    svg
}

pub(crate) fn format_tokens(t: f64) -> String {
    if t >= 1e12 {
        format!("{:.3}T", t / 1e12)
    } else if t >= 1e9 {
        format!("{:.3}B", t / 1e9)
    } else if t >= 1e6 {
        format!("{:.3}M", t / 1e6)
    } else {
        format!("{t}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_pick_a_unit() {
        assert_eq!(human_duration(30.0), "30.0 s");
        assert_eq!(human_duration(600.0), "10.0 min");
        assert_eq!(human_duration(36_000.0), "10.0 h");
        assert_eq!(human_duration(864_000.0), "10.0 d");
        assert_eq!(format_tokens(1e12), "1.000T");
        assert_eq!(escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }
}
