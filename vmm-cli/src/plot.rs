// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm bench --plot`: total time per mode, and remaining dirty bytes per iteration (plotters, SVG).

use std::path::Path;

use plotters::prelude::*;

use crate::bench_scenario::BenchScenario;

type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// Draw the runs: `(mode index, total seconds, remaining bytes after each iteration)`.
pub fn plot(path: &Path, modes: &[BenchScenario], runs: &[(usize, f64, Vec<f64>)]) -> PlotResult {
    let root = SVGBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(520);
    let color = |i: usize| Palette99::pick(i).to_rgba();

    // Total migration time per mode: one dot per run, a bar at the mean.
    let max_t = runs.iter().map(|r| r.1).fold(1.0f64, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&left)
        .caption("Total migration time", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5f64..(modes.len() as f64 - 0.5), 0f64..max_t)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(modes.len().max(1))
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < modes.len() {
                modes[i as usize].label()
            } else {
                String::new()
            }
        })
        .y_desc("seconds")
        .draw()?;
    for (i, _) in modes.iter().enumerate() {
        let times: Vec<f64> = runs.iter().filter(|r| r.0 == i).map(|r| r.1).collect();
        if times.is_empty() {
            continue;
        }
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        let x = i as f64;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x - 0.3, 0.0), (x + 0.3, mean)],
            color(i).mix(0.35).filled(),
        )))?;
        chart.draw_series(
            times
                .iter()
                .map(|t| Circle::new((x, *t), 4, color(i).filled())),
        )?;
    }

    // Remaining dirty bytes after each iteration, one line per run.
    let max_iter = runs.iter().map(|r| r.2.len()).max().unwrap_or(1).max(2);
    let max_mib = runs
        .iter()
        .flat_map(|r| r.2.iter().copied())
        .fold(1.0f64, f64::max)
        / (1u64 << 20) as f64
        * 1.1;
    let mut chart = ChartBuilder::on(&right)
        .caption(
            "Remaining dirty memory after each iteration",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(1f64..max_iter as f64, 0f64..max_mib)?;
    chart
        .configure_mesh()
        .x_desc("iteration")
        .y_desc("MiB")
        .draw()?;
    for (i, mode) in modes.iter().enumerate() {
        let mut first = true;
        for r in runs.iter().filter(|r| r.0 == i) {
            let points: Vec<(f64, f64)> =
                r.2.iter()
                    .enumerate()
                    .map(|(k, b)| ((k + 1) as f64, b / (1u64 << 20) as f64))
                    .collect();
            let series = chart.draw_series(LineSeries::new(points, color(i).stroke_width(2)))?;
            if first {
                let c = color(i);
                series
                    .label(mode.label())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
                first = false;
            }
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
