/**
 * Output helpers shared by the CLI commands, reproducing qemu-img's (QEMU 7.2) formats: its JSON
 * writer (4-space indentation, empty containers on two lines, non-ASCII as \uXXXX), its sizes
 * ("64 MiB", "0.977 KiB": size_to_str), the human `info` text (bdrv_image_info_dump) and the human
 * `map` table.
 */
import debugFactory from 'debug';
import type { MapEntry } from '../qcow2/tools/map.js';

export const trace = debugFactory('qcow2fuse:cli');

/** A JSON string as QEMU's JSON writer quotes it. */
function quote(text: string): string {
  let out = '"';
  for (const ch of text) {
    const cp = ch.codePointAt(0)!;
    switch (ch) {
      case '"': out += '\\"'; break;
      case '\\': out += '\\\\'; break;
      case '\b': out += '\\b'; break;
      case '\f': out += '\\f'; break;
      case '\n': out += '\\n'; break;
      case '\r': out += '\\r'; break;
      case '\t': out += '\\t'; break;
      default:
        if (cp > 0xffff) {
          const hi = 0xd800 + ((cp - 0x10000) >> 10);
          const lo = 0xdc00 + ((cp - 0x10000) & 0x3ff);
          out += `\\u${hi.toString(16).toUpperCase()}\\u${lo.toString(16).toUpperCase()}`;
        } else if (cp < 0x20 || cp >= 0x7f) {
          out += `\\u${cp.toString(16).toUpperCase().padStart(4, '0')}`;
        } else {
          out += ch;
        }
    }
  }
  return `${out}"`;
}

function writeJson(value: unknown, depth: number): string {
  const pad = (d: number): string => `\n${' '.repeat(d * 4)}`;
  if (value === null || value === undefined) return 'null';
  if (typeof value === 'string') return quote(value);
  if (typeof value === 'number' || typeof value === 'boolean' || typeof value === 'bigint') return String(value);
  if (Array.isArray(value)) {
    const items = value.map((v) => `${pad(depth + 1)}${writeJson(v, depth + 1)}`);
    return `[${items.join(',')}${pad(depth)}]`;
  }
  const members = Object.entries(value as Record<string, unknown>)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => `${pad(depth + 1)}${quote(k)}: ${writeJson(v, depth + 1)}`);
  return `{${members.join(',')}${pad(depth)}}`;
}

/** `value` as qemu-img prints it with --output=json (pretty, trailing newline); keys in object order. */
export function qemuJson(value: unknown): string {
  return `${writeJson(value, 0)}\n`;
}

/** C's "%.3g" of num/den (exact, round-half-even like glibc), for size_to_str. */
function formatG3(num: bigint, den: bigint): string {
  if (num === 0n) return '0';
  // exp = floor(log10(num / den)), exactly.
  const below = (e: number): boolean => (e >= 0 ? num < den * 10n ** BigInt(e) : num * 10n ** BigInt(-e) < den);
  let exp = 0;
  while (!below(exp + 1)) exp++;
  while (below(exp)) exp--;
  const scale = 2 - exp;
  const n = scale >= 0 ? num * 10n ** BigInt(scale) : num;
  const d = scale >= 0 ? den : den * 10n ** BigInt(-scale);
  let digits = n / d;
  const twice = (n % d) * 2n;
  if (twice > d || (twice === d && digits % 2n === 1n)) digits++;
  if (digits === 1000n) {
    digits = 100n;
    exp++;
  }
  const text = digits.toString();
  if (exp < -4 || exp >= 3) {
    const mantissa = `${text[0]}.${text.slice(1)}`.replace(/\.?0+$/, '');
    return `${mantissa}e${exp < 0 ? '-' : '+'}${String(Math.abs(exp)).padStart(2, '0')}`;
  }
  const decimals = 2 - exp;
  const padded = text.padStart(decimals + 1, '0');
  const fixed = decimals > 0 ? `${padded.slice(0, -decimals)}.${padded.slice(-decimals)}` : padded;
  return fixed.includes('.') ? fixed.replace(/\.?0+$/, '') : fixed;
}

const SIZE_SUFFIXES = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];

/** QEMU's size_to_str: "0 B", "460 KiB", "64 MiB", "0.977 KiB" (switches unit from 1000 up). */
export function sizeToStr(bytes: number): string {
  // frexp(bytes / (1000 / 1024)) exponent, then one unit per 10 binary orders.
  const scaled = bytes * 1.024;
  let exponent = 0;
  while (scaled >= 2 ** exponent) exponent++;
  const unit = Math.max(0, Math.trunc((exponent - 1) / 10));
  return `${formatG3(BigInt(bytes), 2n ** BigInt(unit * 10))} ${SIZE_SUFFIXES[unit]}B`;
}

/** bdrv_snapshot_dump's columns: header line, or one snapshot. */
function snapshotLine(s: Record<string, unknown> | undefined): string {
  if (!s) return `${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}`;
  const date = new Date(Number(s['date-sec']) * 1000);
  const two = (n: number): string => String(n).padStart(2, '0');
  const dateText = `${date.getFullYear()}-${two(date.getMonth() + 1)}-${two(date.getDate())} ${two(date.getHours())}:${two(date.getMinutes())}:${two(date.getSeconds())}`;
  const clockSec = Number(s['vm-clock-sec']);
  const clockMs = Math.floor(Number(s['vm-clock-nsec']) / 1e6) % 1000;
  const clock = `${two(Math.floor(clockSec / 3600))}:${two(Math.floor(clockSec / 60) % 60)}:${two(clockSec % 60)}.${String(clockMs).padStart(3, '0')}`;
  const icount = typeof s.icount === 'number' ? String(s.icount) : '';
  return `${String(s.id).padEnd(9)} ${String(s.name).padEnd(16)} ${sizeToStr(Number(s['vm-state-size'])).padStart(8)}${dateText.padStart(20)}${clock.padStart(13)}${icount.padStart(11)}`;
}

/** QEMU's dump_qobject for the format-specific part: "key: value", dashes in keys as spaces. */
function dumpQObject(value: unknown, indent: number, lines: string[]): void {
  const pad = ' '.repeat(indent * 4);
  const composite = (v: unknown): boolean => typeof v === 'object' && v !== null;
  if (Array.isArray(value)) {
    value.forEach((v, i) => {
      if (composite(v)) {
        lines.push(`${pad}[${i}]:`);
        dumpQObject(v, indent + 1, lines);
      } else {
        lines.push(`${pad}[${i}]: ${String(v)}`);
      }
    });
    return;
  }
  for (const [key, v] of Object.entries(value as Record<string, unknown>)) {
    const name = key.replaceAll('-', ' ');
    if (composite(v)) {
      lines.push(`${pad}${name}:`);
      dumpQObject(v, indent + 1, lines);
    } else {
      lines.push(`${pad}${name}: ${String(v)}`);
    }
  }
}

/** `qemu-img info` without --output: the text for an info object as imageInfo() builds it. */
export function formatInfoHuman(info: Record<string, unknown>): string {
  const lines: string[] = [];
  const virtualSize = Number(info['virtual-size']);
  const actual = info['actual-size'];
  lines.push(
    `image: ${String(info.filename)}`,
    `file format: ${String(info.format)}`,
    `virtual size: ${sizeToStr(virtualSize)} (${virtualSize} bytes)`,
    `disk size: ${actual === undefined ? 'unavailable' : sizeToStr(Number(actual))}`,
  );
  if (info['cluster-size'] !== undefined) lines.push(`cluster_size: ${Number(info['cluster-size'])}`);
  if (info['dirty-flag'] === true) lines.push('cleanly shut down: no');
  const backing = info['backing-filename'];
  if (typeof backing === 'string') {
    const full = info['full-backing-filename'];
    const actualPath = typeof full !== 'string' ? ' (cannot determine actual path)' : full !== backing ? ` (actual path: ${full})` : '';
    lines.push(`backing file: ${backing}${actualPath}`);
    const backingFormat = info['backing-filename-format'];
    if (typeof backingFormat === 'string') lines.push(`backing file format: ${backingFormat}`);
  }
  const snapshots = info.snapshots as Record<string, unknown>[] | undefined;
  if (snapshots) {
    lines.push('Snapshot list:', snapshotLine(undefined));
    for (const s of snapshots) lines.push(snapshotLine(s));
  }
  const specific = info['format-specific'] as { data?: unknown } | undefined;
  if (specific?.data !== undefined) {
    lines.push('Format specific information:');
    dumpQObject(specific.data, 1, lines);
  }
  return `${lines.join('\n')}\n`;
}

/** "%#x": 0x-prefixed hex, plain "0" for zero. */
function altHex(n: number): string {
  return n === 0 ? '0' : `0x${n.toString(16)}`;
}

/** The header line of `qemu-img map` (human format). */
export const MAP_HUMAN_HEADER = `${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`;

/**
 * One extent in `qemu-img map`'s human table: only data that is not known zero is listed; data
 * without a host offset (compressed) cannot be, and makes the command fail, as in qemu-img.
 */
export function mapHumanLine(entry: MapEntry): { line?: string; error?: string } {
  if (entry.data && entry.offset === undefined) return { error: 'File contains external, encrypted or compressed clusters.' };
  if (!entry.data || entry.zero) return {};
  return { line: `${altHex(entry.start).padEnd(16)}${altHex(entry.length).padEnd(16)}${altHex(entry.offset!).padEnd(16)}${entry.filename ?? ''}\n` };
}

/** qemu-img's progress line ("    (42.00/100%)" + CR), written while a long command runs. */
export function progressText(fraction: number): string {
  return `    (${(Math.min(1, Math.max(0, fraction)) * 100).toFixed(2)}/100%)\r`;
}

/** An error for the user: its message, with the error code when it has one. */
export function commandError(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err);
  const code = (err as { code?: unknown } | undefined)?.code;
  return typeof code === 'string' ? `${message} [${code}]` : message;
}

let stdoutGuarded = false;

/**
 * Write to stdout and wait until it is handed on (backpressure for large outputs); rejects when
 * stdout is gone (EPIPE: `qcow2fuse map … | head`).
 */
export function writeOut(chunk: string | Uint8Array): Promise<void> {
  if (!stdoutGuarded) {
    // Write errors also reach the callback below; without a listener they would crash the process.
    process.stdout.on('error', () => undefined);
    stdoutGuarded = true;
  }
  return new Promise((resolve, reject) => {
    process.stdout.write(chunk, (err) => (err ? reject(err) : resolve()));
  });
}
