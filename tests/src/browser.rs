//! A headless Chromium driven over WebDriver: Debian's `chromium` and `chromedriver` as child
//! processes on a free port, for the console's tests. Screenshots go to `TIDINGS_SCREENSHOTS`,
//! or to `target/screenshots` of the workspace.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use fantoccini::wd::Capabilities;

use crate::{free_port, wait_until};

/// A browser session, ended (and its driver stopped) when dropped or closed.
pub struct Browser {
    driver: Child,
    /// The WebDriver session.
    pub client: fantoccini::Client,
    shots: PathBuf,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser").finish_non_exhaustive()
    }
}

fn chromium() -> String {
    if let Ok(path) = std::env::var("CHROMIUM") {
        return path;
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("chromium")
        .to_string()
}

impl Browser {
    /// Starts chromedriver and a headless Chromium of `width` × `height` pixels.
    pub async fn start(width: u32, height: u32) -> anyhow::Result<Self> {
        let port = free_port()?;
        let binary = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let driver = Command::new(&binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {binary} (Debian's chromium-driver)"))?;
        let url = format!("http://127.0.0.1:{port}");
        let mut capabilities = Capabilities::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium(),
                "args": [
                    "--headless=new",
                    // Tests run as root in CI, where Chromium's sandbox cannot start.
                    "--no-sandbox",
                    "--disable-dev-shm-usage",
                    "--disable-gpu",
                    format!("--window-size={width},{height}"),
                ],
            }),
        );
        let client = wait_until("chromedriver to answer", Duration::from_secs(30), || {
            let capabilities = capabilities.clone();
            let url = url.clone();
            async move {
                let connector = hyper_util::client::legacy::connect::HttpConnector::new();
                fantoccini::ClientBuilder::new(connector)
                    .capabilities(capabilities)
                    .connect(&url)
                    .await
                    .ok()
            }
        })
        .await?;
        let shots = match std::env::var_os("TIDINGS_SCREENSHOTS") {
            Some(dir) => PathBuf::from(dir),
            None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots"),
        };
        std::fs::create_dir_all(&shots)?;
        Ok(Self { driver, client, shots })
    }

    /// Saves a PNG of the viewport as `name.png`.
    pub async fn screenshot(&self, name: &str) -> anyhow::Result<PathBuf> {
        let png = self.client.screenshot().await?;
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png)?;
        Ok(path)
    }

    /// Ends the session and stops the driver.
    pub async fn close(mut self) -> anyhow::Result<()> {
        let client = self.client.clone();
        client.close().await?;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
