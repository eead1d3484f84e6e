//! `tidings contacts`: import a CSV or JSON-lines file through `BatchUpsertContacts` with a
//! progress display, writing the rows that cannot be imported to a rejects file; get one.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use tidings_client::v1::Contact;

use super::messages::{parse, to_json};
use super::remote::{Format, Remote, Usage, count, print_json};

/// Contacts sent in one message of the stream: the server's own batch size.
const BATCH: usize = 1000;

/// `tidings contacts`.
#[derive(Debug, clap::Args)]
pub(crate) struct ContactsArgs {
    #[command(subcommand)]
    action: ContactAction,
    #[command(flatten)]
    remote: Remote,
}

#[derive(Debug, clap::Subcommand)]
enum ContactAction {
    /// Imports contacts from a CSV file with a header row, or from JSON lines (one contact per
    /// line, as `tidings contacts get -o json` prints it). CSV columns: `id` (required),
    /// `timezone`, `unsubscribed`; every other column is an attribute, numbers and true/false
    /// typed as such, empty cells left out.
    Import {
        /// The file: `.csv`, or `.jsonl` / `.ndjson` / `.json` for JSON lines.
        file: PathBuf,
        /// Where rows that cannot be imported go, one JSON object per line with the line
        /// number and the reason; FILE.rejects.jsonl by default.
        #[arg(long)]
        rejects: Option<PathBuf>,
        /// Starts at this line of the file (1 is the first line; the CSV header is always
        /// read), to resume an import that stopped.
        #[arg(long, default_value_t = 1)]
        from_line: u64,
        /// Contacts per call: each call is one stream, and an import that stops resumes at
        /// the first line of the call that failed. Above 1,000 the server lists only the
        /// first 1,000 rejects of a call: the others are counted, not written.
        #[arg(long, default_value_t = BATCH)]
        chunk: usize,
    },
    /// Prints one contact.
    Get {
        /// The contact's id.
        id: String,
    },
}

pub(crate) async fn contacts(args: ContactsArgs) -> anyhow::Result<()> {
    let output = args.remote.output;
    match args.action {
        ContactAction::Get { id } => {
            let client = args.remote.connect().await?;
            let contact = client.contacts().get(id).await?;
            if output == Format::Json {
                print_json(&to_json(&contact)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&to_json(&contact)?)?);
            }
            Ok(())
        }
        ContactAction::Import { file, rejects, from_line, chunk } => {
            if chunk == 0 {
                return Err(Usage("--chunk: must be at least 1".into()).into());
            }
            let rejects = rejects.unwrap_or_else(|| {
                let mut name = file.clone().into_os_string();
                name.push(".rejects.jsonl");
                PathBuf::from(name)
            });
            let client = args.remote.connect().await?;
            import(&client, &file, &rejects, from_line, chunk, output).await
        }
    }
}

/// One row of the file: its line and the contact, or why it is not one.
struct Row {
    line: u64,
    contact: Result<Contact, (String, serde_json::Value)>,
    /// Bytes of the file read up to the end of this row, for the progress display.
    offset: u64,
}

/// Reads rows from CSV or JSON lines.
enum Rows {
    Csv { reader: csv::Reader<File>, header: Vec<String>, record: csv::StringRecord },
    Lines { reader: BufReader<File>, line: u64, offset: u64, buffer: String },
}

impl Rows {
    fn open(path: &Path) -> anyhow::Result<Self> {
        let shown = path.display();
        let file =
            File::open(path).map_err(|error| Usage(format!("{shown}: cannot read: {error}")))?;
        let extension =
            path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        match extension.as_str() {
            "csv" => {
                let mut reader =
                    csv::ReaderBuilder::new().flexible(true).has_headers(true).from_reader(file);
                let header: Vec<String> = reader
                    .headers()
                    .map_err(|error| Usage(format!("{shown}: header: {error}")))?
                    .iter()
                    .map(|h| h.trim().to_string())
                    .collect();
                if !header.iter().any(|h| h == "id") {
                    return Err(Usage(format!(
                        "{shown}: header: needs an id column (found {})",
                        header.join(", ")
                    ))
                    .into());
                }
                Ok(Rows::Csv { reader, header, record: csv::StringRecord::new() })
            }
            "jsonl" | "ndjson" | "json" => Ok(Rows::Lines {
                reader: BufReader::new(file),
                line: 0,
                offset: 0,
                buffer: String::new(),
            }),
            _ => Err(Usage(format!(
                "{shown}: unknown format; name it .csv, or .jsonl for JSON lines"
            ))
            .into()),
        }
    }

    fn next(&mut self) -> anyhow::Result<Option<Row>> {
        match self {
            Rows::Csv { reader, header, record } => {
                let more = match reader.read_record(record) {
                    Ok(more) => more,
                    Err(error) => {
                        let line = error.position().map_or(0, |p| p.line());
                        let offset = error.position().map_or(0, |p| p.byte());
                        let reason = format!("not CSV: {error}");
                        return Ok(Some(Row {
                            line,
                            contact: Err((reason, serde_json::Value::Null)),
                            offset,
                        }));
                    }
                };
                if !more {
                    return Ok(None);
                }
                let position = record.position().cloned();
                let line = position.as_ref().map_or(0, |p| p.line());
                let offset = reader.position().byte();
                Ok(Some(Row { line, contact: csv_contact(header, record), offset }))
            }
            Rows::Lines { reader, line, offset, buffer } => loop {
                buffer.clear();
                let read = reader.read_line(buffer).context("cannot read the file")?;
                if read == 0 {
                    return Ok(None);
                }
                *line += 1;
                *offset += read as u64;
                let text = buffer.trim();
                if text.is_empty() {
                    continue;
                }
                let contact =
                    parse::<Contact>(text, "line").map(|(contact, _)| contact).map_err(|error| {
                        let reason = error.to_string().trim_start_matches("line: ").to_string();
                        (reason, serde_json::Value::String(text.to_string()))
                    });
                return Ok(Some(Row { line: *line, contact, offset: *offset }));
            },
        }
    }
}

/// Returns a CSV cell as JSON: numbers and booleans typed, the rest text.
fn cell(text: &str) -> serde_json::Value {
    if let Ok(n) = text.parse::<i64>() {
        return n.into();
    }
    if let Ok(x) = text.parse::<f64>()
        && x.is_finite()
    {
        return x.into();
    }
    match text {
        "true" => true.into(),
        "false" => false.into(),
        _ => text.into(),
    }
}

fn csv_contact(
    header: &[String],
    record: &csv::StringRecord,
) -> Result<Contact, (String, serde_json::Value)> {
    let row: serde_json::Map<String, serde_json::Value> = header
        .iter()
        .zip(record.iter())
        .map(|(name, value)| (name.clone(), serde_json::Value::String(value.to_string())))
        .collect();
    let raw = serde_json::Value::Object(row);
    if record.len() != header.len() {
        let reason = format!("has {} fields, the header {}", record.len(), header.len());
        return Err((reason, raw));
    }
    let mut contact = Contact::default();
    let mut attributes = serde_json::Map::new();
    for (name, value) in header.iter().zip(record.iter()) {
        let value = value.trim();
        match name.as_str() {
            "id" => contact.id = value.to_string(),
            "timezone" => contact.timezone = value.to_string(),
            "unsubscribed" => {
                contact.unsubscribed = match value {
                    "" | "false" | "0" => false,
                    "true" | "1" => true,
                    other => {
                        let reason = format!("unsubscribed: {other:?} is not true or false");
                        return Err((reason, raw));
                    }
                }
            }
            _ if value.is_empty() => {}
            _ => {
                attributes.insert(name.clone(), cell(value));
            }
        }
    }
    if contact.id.is_empty() {
        return Err(("id: required".into(), raw));
    }
    contact.attributes = Some(tidings_api::json::json_to_struct(&attributes));
    Ok(contact)
}

/// The rejects file, created at the first reject.
struct Rejects {
    path: PathBuf,
    file: Option<std::io::BufWriter<File>>,
    count: u64,
}

impl Rejects {
    fn write(
        &mut self,
        line: u64,
        id: &str,
        reason: &str,
        row: serde_json::Value,
    ) -> anyhow::Result<()> {
        if self.file.is_none() {
            let file = File::create(&self.path)
                .with_context(|| format!("--rejects: cannot create {}", self.path.display()))?;
            self.file = Some(std::io::BufWriter::new(file));
        }
        let entry = serde_json::json!({ "line": line, "id": id, "reason": reason, "row": row });
        if let Some(file) = &mut self.file {
            writeln!(file, "{entry}")?;
        }
        self.count += 1;
        Ok(())
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        if let Some(file) = &mut self.file {
            file.flush()?;
        }
        Ok(())
    }
}

/// Shows how far the import is: redrawn on a terminal, a line a second otherwise.
struct Progress {
    started: Instant,
    shown: Instant,
    total_bytes: u64,
    terminal: bool,
    quiet: bool,
}

impl Progress {
    fn show(&mut self, imported: u64, line: u64, offset: u64, rejected: u64, last: bool) {
        let every = if self.terminal { Duration::from_millis(200) } else { Duration::from_secs(1) };
        if self.quiet || (!last && self.shown.elapsed() < every) {
            return;
        }
        self.shown = Instant::now();
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = imported as f64 / elapsed;
        let share =
            if self.total_bytes == 0 { 1.0 } else { offset as f64 / self.total_bytes as f64 };
        let eta = if share > 0.0 { elapsed * (1.0 - share) / share } else { 0.0 };
        let filled = (share.clamp(0.0, 1.0) * 30.0).round() as usize;
        let text = format!(
            "[{}{}] {:>3.0}%  {} imported  {} rejected  line {}  {}/s  ETA {:.0}s",
            "#".repeat(filled),
            "-".repeat(30 - filled),
            share * 100.0,
            count(imported),
            count(rejected),
            count(line),
            count(rate as u64),
            eta.max(0.0),
        );
        if self.terminal {
            eprint!("\r\x1b[2K{text}");
            if last {
                eprintln!();
            }
        } else {
            eprintln!("{text}");
        }
    }
}

async fn import(
    client: &tidings_client::Client,
    file: &Path,
    rejects_path: &Path,
    from_line: u64,
    chunk_size: usize,
    output: Format,
) -> anyhow::Result<()> {
    let total_bytes = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let mut rows = Rows::open(file)?;
    let mut rejects = Rejects { path: rejects_path.to_path_buf(), file: None, count: 0 };
    let mut progress = Progress {
        started: Instant::now(),
        shown: Instant::now(),
        total_bytes,
        terminal: std::io::stderr().is_terminal(),
        quiet: output == Format::Json,
    };
    let contacts = client.contacts();
    let (mut imported, mut last_line, mut offset) = (0u64, 0u64, 0u64);
    let mut done = false;
    while !done {
        // One chunk: the lines of its contacts, to name a reject and to resume after a failure.
        let mut chunk: Vec<(u64, Contact)> = Vec::with_capacity(chunk_size);
        while chunk.len() < chunk_size {
            let Some(row) = rows.next()? else {
                done = true;
                break;
            };
            offset = row.offset;
            if row.line < from_line {
                continue;
            }
            last_line = row.line;
            match row.contact {
                Ok(contact) => chunk.push((row.line, contact)),
                Err((reason, raw)) => {
                    let id = raw.get("id").and_then(|v| v.as_str()).unwrap_or("").to_string();
                    rejects.write(row.line, &id, &reason, raw)?;
                }
            }
        }
        if chunk.is_empty() {
            continue;
        }
        let first_line = chunk[0].0;
        let batches: Vec<Vec<Contact>> = chunk
            .chunks(BATCH)
            .map(|batch| batch.iter().map(|(_, c)| c.clone()).collect())
            .collect();
        let response = match contacts.batch_upsert(futures::stream::iter(batches)).await {
            Ok(response) => response,
            Err(error) => {
                rejects.finish()?;
                progress.show(imported, last_line, offset, rejects.count, true);
                return Err(anyhow::Error::new(error).context(format!(
                    "{}: stopped at line {first_line}; {} contacts imported before it; resume with --from-line {first_line}",
                    file.display(),
                    count(imported)
                )));
            }
        };
        imported += response.upserted;
        for reject in &response.rejected {
            let (line, contact) = usize::try_from(reject.index)
                .ok()
                .and_then(|i| chunk.get(i))
                .map_or((0, None), |(line, contact)| (*line, Some(contact)));
            let row = contact.map(to_json).transpose()?.unwrap_or(serde_json::Value::Null);
            rejects.write(line, &reject.id, &reject.reason, row)?;
        }
        // The server lists the first 1,000 rejects of a call; the rest are only counted.
        rejects.count += response.rejected_count.saturating_sub(response.rejected.len() as u64);
        progress.show(imported, last_line, offset, rejects.count, false);
    }
    rejects.finish()?;
    progress.show(imported, last_line, offset, rejects.count, true);
    let seconds = progress.started.elapsed().as_secs_f64();
    if output == Format::Json {
        print_json(&serde_json::json!({
            "imported": imported,
            "rejected": rejects.count,
            "rejects_file": (rejects.count > 0).then(|| rejects_path.display().to_string()),
            "last_line": last_line,
            "seconds": seconds,
        }));
    } else {
        println!(
            "imported {} contacts from {} in {:.1} s ({}/s)",
            count(imported),
            file.display(),
            seconds,
            count((imported as f64 / seconds.max(1e-3)) as u64)
        );
        if rejects.count > 0 {
            println!("{} rejected, written to {}", count(rejects.count), rejects_path.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_typed_and_rows_checked() {
        let header: Vec<String> = ["id", "plan", "n", "vip", "timezone"].map(String::from).to_vec();
        let record = csv::StringRecord::from(vec!["u1", "pro", "42", "true", "Europe/Paris"]);
        let contact = csv_contact(&header, &record).expect("a contact");
        let attributes = tidings_api::json::struct_to_json(&contact.attributes.unwrap_or_default());
        assert_eq!(
            serde_json::Value::Object(attributes),
            serde_json::json!({"plan": "pro", "n": 42, "vip": true})
        );
        assert_eq!(contact.timezone, "Europe/Paris");
        let missing = csv::StringRecord::from(vec!["", "pro", "1", "false", ""]);
        assert_eq!(csv_contact(&header, &missing).map_err(|e| e.0), Err("id: required".into()));
        let short = csv::StringRecord::from(vec!["u2", "pro"]);
        assert!(csv_contact(&header, &short).is_err());
    }
}
