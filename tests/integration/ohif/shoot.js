// Open a study in OHIF with headless Debian chromium (playwright-core), wait until the
// expected segment labels are in the page, take a screenshot, print a JSON result.
// usage: node shoot.js URL SCREENSHOT.png TIMEOUT_MS LABEL [LABEL...]
// SHOOT_STEPS=n in the environment: after the labels appear, step n images (ArrowDown).
const { chromium } = require('playwright-core');
const fs = require('fs');
const os = require('os');
const path = require('path');

const [url, screenshot, timeoutArg, ...labels] = process.argv.slice(2);
const timeoutMs = parseInt(timeoutArg, 10);

(async () => {
  const userDir = fs.mkdtempSync(path.join(os.tmpdir(), 'ohif-chromium-'));
  const context = await chromium.launchPersistentContext(userDir, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1400, height: 900 },
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--enable-unsafe-swiftshader', '--use-angle=swiftshader',
    ],
  });
  const consoleLines = [];
  const result = { found: [], missing: labels, errors: [], console: consoleLines };
  try {
    await context.addInitScript(() => {
      window.localStorage.setItem('shownTours', '["basicViewerTour"]');
    });
    const page = context.pages()[0] || (await context.newPage());
    page.on('console', (msg) => {
      if (consoleLines.length < 200) consoleLines.push(`${msg.type()}: ${msg.text()}`.slice(0, 300));
    });
    page.on('pageerror', (err) => result.errors.push(String(err).slice(0, 300)));
    await page.goto(url, { waitUntil: 'domcontentloaded', timeout: timeoutMs });
    const deadline = Date.now() + timeoutMs;
    const started = Date.now();
    let panelOpened = false;
    while (Date.now() < deadline) {
      const text = await page.evaluate(() => document.body.innerText);
      result.found = labels.filter((l) => text.includes(l));
      result.missing = labels.filter((l) => !text.includes(l));
      if (result.missing.length === 0) break;
      // the segmentation panel (right side) starts collapsed: open it once the viewer is up
      if (!panelOpened && Date.now() - started > 5000) {
        const toggle = await page.$('[data-cy="side-panel-header-right"]');
        if (toggle) {
          await toggle.click();
          panelOpened = true;
          result.panelOpenedAfterMs = Date.now() - started;
        }
      }
      await page.waitForTimeout(500);
    }
    const steps = parseInt(process.env.SHOOT_STEPS || '0', 10);
    if (result.missing.length === 0 && steps > 0) {
      const box = await page.evaluate(() => {
        const el = document.querySelector('.cornerstone-viewport-element, [data-viewport-uid]');
        if (!el) return null;
        const r = el.getBoundingClientRect();
        return { x: r.x + r.width / 2, y: r.y + r.height / 2 };
      });
      if (box) await page.mouse.move(box.x, box.y);
      for (let i = 0; i < steps; i += 1) {
        await page.keyboard.press('ArrowDown');
        await page.waitForTimeout(300);
      }
    }
    // let the viewport finish painting the overlay: wait until two screenshots agree
    let previous = null;
    for (let i = 0; i < 20; i += 1) {
      await page.waitForTimeout(750);
      const shot = await page.screenshot({ path: screenshot });
      if (previous && Buffer.compare(previous, shot) === 0) break;
      previous = shot;
    }
    result.text = (await page.evaluate(() => document.body.innerText)).slice(0, 4000);
  } catch (err) {
    result.errors.push(String(err));
  } finally {
    await context.close();
    fs.rmSync(userDir, { recursive: true, force: true });
  }
  process.stdout.write(JSON.stringify(result) + '\n');
})();
