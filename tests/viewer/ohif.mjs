// Drives the OHIF viewer in headless Chromium against a medledger node, as a radiologist would:
// the study list (the study's row, then its series preview), then the study in the viewer until
// a CT slice is on screen, then a scroll to the middle of the stack; it waits for every request
// to the node to end before its screenshot.
//
// Run by crates/cli/tests/viewer.rs; reads its inputs from the environment:
//   VIEWER_DIR   the folder scripts/install-viewer prepared (holds node_modules/playwright-core)
//   VIEWER_URL   where the OHIF build is served (e.g. http://127.0.0.1:PORT)
//   NODE_URL     the node's origin (its DICOMweb root is NODE_URL/dicom-web)
//   STUDY_UID    the study to find and open
//   PATIENT_ID   the patient ID the study list must show (the pseudonym)
//   SCREENSHOT   where to save a PNG of the viewer with the slice on screen
//   CHROMIUM     the browser (default /usr/bin/chromium); Playwright never downloads one
//   TIMEOUT_MS   the limit of each wait (default 60000)
// Prints one JSON object on stdout (what it saw, every request to the node); logs go to
// stderr. Exits 0 when it could run to the end, even if what it saw is wrong: the Rust test
// judges the report. Exits 1 on a failure to run, with {"error": ...} on stdout.
import { createRequire } from 'node:module';
import path from 'node:path';

const env = name => {
  const v = process.env[name];
  if (!v) {
    throw new Error(`${name} is not set`);
  }
  return v;
};
const log = (...a) => console.error('[ohif.mjs]', ...a);

const viewerDir = env('VIEWER_DIR');
const viewerUrl = env('VIEWER_URL').replace(/\/$/, '');
const nodeUrl = env('NODE_URL').replace(/\/$/, '');
const studyUid = env('STUDY_UID');
const patientId = env('PATIENT_ID');
const screenshot = env('SCREENSHOT');
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const timeout = Number(process.env.TIMEOUT_MS || 60000);

// playwright-core lives in the cache folder, not beside this script.
const require = createRequire(path.join(viewerDir, 'package.json'));
const { chromium } = require('playwright-core');

const started = Date.now();
const ms = () => Date.now() - started;
const report = {
  studyList: null,
  viewer: null,
  requests: [],
  blocked: [],
  pageErrors: [],
  consoleErrors: [],
  timings: {},
};

// What kind of DICOMweb call a URL to the node is.
function kindOf(url) {
  const u = new URL(url);
  const p = u.pathname.replace(/^\/dicom-web/, '');
  if (/\/frames\/[^/]+\/rendered$/.test(p) || /\/rendered$/.test(p)) return 'rendered';
  if (/\/thumbnail$/.test(p)) return 'thumbnail';
  if (/\/frames\/[^/]+$/.test(p)) return 'frames';
  if (/\/metadata$/.test(p)) return 'metadata';
  if (/^\/(studies|series|instances)$/.test(p)) return 'qido';
  if (/^\/studies\/[^/]+\/(series|instances)$/.test(p)) return 'qido';
  if (/^\/studies\/[^/]+\/series\/[^/]+\/instances$/.test(p)) return 'qido';
  return 'other';
}

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--disable-dev-shm-usage',
    // Names never resolve: nothing leaves this machine, whatever the page asks for.
    '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1',
  ],
});
let exitCode = 0;
try {
  const context = await browser.newContext({
    viewport: { width: 1400, height: 900 },
    serviceWorkers: 'block',
  });
  // Only loopback is reached; anything else (fonts, CDNs, analytics) is refused at once.
  await context.route('**/*', route => {
    const u = new URL(route.request().url());
    if (
      u.protocol === 'data:' ||
      u.protocol === 'blob:' ||
      u.hostname === '127.0.0.1' ||
      u.hostname === 'localhost'
    ) {
      return route.continue();
    }
    report.blocked.push(route.request().url());
    return route.abort('blockedbyclient');
  });
  const page = await context.newPage();
  page.setDefaultTimeout(timeout);
  page.on('pageerror', e => report.pageErrors.push(String(e && e.stack ? e.stack : e)));
  page.on('console', m => {
    if (m.type() === 'error') report.consoleErrors.push(m.text().slice(0, 500));
  });

  // Every request to the node, with its outcome.
  const pending = new Map();
  const onRequest = req => {
    if (!req.url().startsWith(nodeUrl + '/')) return;
    const entry = {
      method: req.method(),
      url: req.url().slice(nodeUrl.length),
      kind: kindOf(req.url()),
      accept: req.headers()['accept'] || null,
      status: null,
      contentType: null,
      failure: null,
      at: ms(),
    };
    report.requests.push(entry);
    pending.set(req, entry);
  };
  const onResponse = async resp => {
    const entry = pending.get(resp.request());
    if (!entry) return;
    entry.status = resp.status();
    entry.contentType = resp.headers()['content-type'] || null;
    if (entry.status >= 400) {
      try {
        entry.body = (await resp.text()).slice(0, 500);
      } catch (e) {
        entry.body = null;
      }
    }
  };
  const onFailed = req => {
    const entry = pending.get(req);
    if (!entry) return;
    entry.failure = (req.failure() && req.failure().errorText) || 'failed';
  };
  const onFinished = req => {
    const entry = pending.get(req);
    if (entry) entry.ms = ms() - entry.at;
  };
  page.on('request', onRequest);
  page.on('response', onResponse);
  page.on('requestfailed', onFailed);
  page.on('requestfinished', onFinished);

  // 1. The study list: the study's row, with its pseudonym, modality and instance count.
  await page.goto(`${viewerUrl}/`, { waitUntil: 'domcontentloaded' });
  const cell = page.getByText(patientId, { exact: true }).first();
  await cell.waitFor({ state: 'visible' });
  report.timings.studyListMs = ms();
  const row = await cell.evaluate(el => {
    let r = el;
    while (r && r.tagName !== 'TR' && !(r.getAttribute && r.getAttribute('role') === 'row')) {
      r = r.parentElement;
    }
    r = r || el.parentElement;
    const cells = Array.from(r.querySelectorAll('td, [role="cell"], [role="gridcell"]')).map(c =>
      (c.innerText || '').trim()
    );
    return { text: (r.innerText || '').trim(), cells };
  });
  report.studyList = row;
  // Selecting the row previews its series, with thumbnails from the node.
  await cell.click();
  const thumb = () =>
    report.requests.some(r => r.kind === 'thumbnail' && r.status !== null && r.ms !== undefined);
  const until = Date.now() + timeout;
  while (!thumb() && Date.now() < until) {
    await page.waitForTimeout(200);
  }
  report.studyList.previewImages = await page.evaluate(
    () => Array.from(document.images).filter(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0).length
  );
  report.timings.previewMs = ms();
  await page.screenshot({ path: screenshot.replace(/\.png$/, '-list.png') });

  // 2. The study in the viewer, until a CT slice is drawn.
  const viewerStart = ms();
  await page.goto(`${viewerUrl}/viewer?StudyInstanceUIDs=${encodeURIComponent(studyUid)}`, {
    waitUntil: 'domcontentloaded',
  });
  const frameOk = () =>
    report.requests.some(r => r.kind === 'frames' && r.status === 200 && r.ms !== undefined);
  // The drawn pixels of the largest viewport canvas: how many distinct grey levels, their spread.
  const probe = () =>
    page.evaluate(() => {
      const canvases = Array.from(document.querySelectorAll('canvas')).filter(
        c => c.width > 64 && c.height > 64
      );
      if (!canvases.length) return null;
      canvases.sort((a, b) => b.width * b.height - a.width * a.height);
      const c = canvases[0];
      const copy = document.createElement('canvas');
      copy.width = c.width;
      copy.height = c.height;
      const g = copy.getContext('2d');
      g.drawImage(c, 0, 0);
      const { data } = g.getImageData(0, 0, c.width, c.height);
      const levels = new Set();
      let sum = 0;
      let sum2 = 0;
      let n = 0;
      for (let i = 0; i < data.length; i += 4 * 7) {
        const v = (data[i] + data[i + 1] + data[i + 2]) / 3;
        levels.add(Math.round(v));
        sum += v;
        sum2 += v * v;
        n += 1;
      }
      const mean = sum / n;
      return {
        className: c.className,
        width: c.width,
        height: c.height,
        distinct: levels.size,
        mean,
        std: Math.sqrt(Math.max(0, sum2 / n - mean * mean)),
      };
    });
  let pixels = null;
  const deadline = Date.now() + timeout;
  for (;;) {
    if (frameOk()) {
      pixels = await probe().catch(() => null);
      if (pixels && pixels.distinct >= 16 && pixels.std > 5) break;
    }
    if (Date.now() > deadline) break;
    await page.waitForTimeout(250);
  }
  report.timings.sliceMs = ms() - viewerStart;
  // The onboarding tour covers the image: skip it, as a user would.
  const skip = page.getByText('Skip all', { exact: true });
  if (await skip.isVisible().catch(() => false)) {
    await skip.click().catch(() => {});
  }
  // Scroll to the middle of the stack, one wheel step at a time as a reader would (the
  // overlay tells the slice shown, "(n/64)"), and wait for that slice to be drawn.
  const first = pixels;
  const sliceNow = async () => {
    const text = await page.evaluate(() => document.body.innerText).catch(() => '');
    const m = text.match(/\((\d+)\s*\/\s*(\d+)\)/);
    return m ? Number(m[1]) : null;
  };
  const target = 32;
  const canvas = page.locator('canvas.cornerstone-canvas').first();
  let scrolled = await sliceNow();
  if (scrolled !== null && (await canvas.isVisible().catch(() => false))) {
    const box = await canvas.boundingBox();
    await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
    const until = Date.now() + timeout;
    while (scrolled !== target && Date.now() < until) {
      await page.mouse.wheel(0, scrolled < target ? 100 : -100);
      const stepStart = Date.now();
      let now = scrolled;
      while (now === scrolled && Date.now() - stepStart < 2000) {
        await page.waitForTimeout(40);
        now = await sliceNow();
      }
      scrolled = now;
    }
    pixels = null;
    while (Date.now() < until) {
      pixels = await probe().catch(() => null);
      if (pixels && pixels.distinct >= 16 && pixels.std > 5) break;
      await page.waitForTimeout(250);
    }
  }
  report.timings.scrolledMs = ms() - viewerStart;
  // Let every request to the node end (the viewer prefetches the whole stack).
  const quiet = Date.now() + timeout;
  while (Date.now() < quiet) {
    const open = report.requests.filter(r => r.status === null && r.failure === null).length;
    const unread = report.requests.filter(r => r.status !== null && r.ms === undefined && r.failure === null).length;
    if (open + unread === 0) break;
    await page.waitForTimeout(250);
  }
  report.timings.quietMs = ms() - viewerStart;
  await page.waitForTimeout(500);
  await page.screenshot({ path: screenshot });
  const overlay = await page.evaluate(() => document.body.innerText.slice(0, 2000));
  report.viewer = { url: page.url(), firstSlice: first, slice: scrolled, pixels, text: overlay };
  report.timings.totalMs = ms();
  // Requests still open now are listed as such.
  for (const r of report.requests) {
    if (r.status === null && r.failure === null) r.failure = 'unfinished';
  }
  await context.close();
} catch (e) {
  report.error = String(e && e.stack ? e.stack : e);
  exitCode = 1;
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(report) + '\n');
process.exit(exitCode);
