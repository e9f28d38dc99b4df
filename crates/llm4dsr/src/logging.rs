//! tracing setup: human-readable lines on stderr, level from `-v`/`RUST_LOG`, and the rank
//! in every line when the job has more than one.

use tracing_subscriber::EnvFilter;

pub fn init(verbose: u8, rank: usize, size: usize) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: Slurm/CI log files stay free of escape codes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = if size > 1 {
        // Each line carries the rank so interleaved logs from many ranks stay readable.
        builder
            .fmt_fields(tracing_subscriber::fmt::format::DefaultFields::new())
            .event_format(RankFormat { rank, size })
            .try_init()
    } else {
        builder.try_init()
    };
}

struct RankFormat {
    rank: usize,
    size: usize,
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for RankFormat
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        write!(
            writer,
            "[rank {}/{}] {:>5} ",
            self.rank,
            self.size,
            meta.level()
        )?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
