/** The copy engine of `convert` (library API; see engine.ts and convert-files.ts). */
export { convertImage, WINDOW_BYTES, type ConvertOptions, type ConvertResult } from './engine.js';
export { convertFiles, type ConvertFilesOptions } from './convert-files.js';
export { openConvertSource, hasQcow2Magic, type ConvertSource, type SourceExtent, type OpenSourceOptions, type ImageFormat } from './source.js';
export { openConvertSink, type ConvertSink, type OpenSinkOptions, type ConvertCacheMode } from './sink.js';
export { ConvertError } from './errors.js';
export { ProgressReporter, progressLine, type ProgressOptions } from './progress.js';
export { classifyWindow, type Run, type RunKind, type ClassifyOptions } from './zero-runs.js';
